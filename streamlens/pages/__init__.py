"""HTML pages composed from figures: `html` (Report, Section: the one page builder) and one module per
command that writes a page (`report`, `ablation`, `highway`). Pages take results, never a model run
of their own, except `report.standard_report`, which runs the standard analyses it shows.
"""
