"""The field's ground-truth files and metrics as pure functions (numpy in, numbers out).

`retrieval`: ISC2021 micro-AP, Revisited Oxford/Paris mAP, CMC, k-NN recall; `groundtruth`: the
DISC21 CSV, revisitop's pickles and label files; `gldv2`: GLDv2's retrieval solution, submission
files and mAP@100. Training, evaluation and the data set layouts all use them; nothing here knows
about indexes, models or Ray.
"""
