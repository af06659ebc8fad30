"""Pages to look at: self-contained HTML files of search results and evaluation reports, and the
service's search page.

    render.py    jinja2 templates (shipped in templates/), thumbnails and figures as data: URIs
    plots.py     matplotlib figures (Agg): precision-recall, CMC, score histograms, ANN sweeps
    results.py   `raysearch search --html`: each query beside its top-k
    reports.py   `raysearch eval ... --report DIR` and `raysearch activate --report DIR`
    browser.py   headless Chromium: screenshots and the DOM after the page's scripts ran

Every page file opens offline: images and plots are embedded, no script or style is fetched.
"""
