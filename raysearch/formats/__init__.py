"""The folder formats raysearch writes and reads back: embeddings folders (`embeddings`), resumable
run folders (`runs`) and stored local features (`local`). Every other floor reads them through here."""
