"""The pruning report: the machine-readable record of what a pruning run did, beside every checkpoint."""

#: Written by `hfprune.export.save_pruned` into every exported checkpoint.
REPORT_FILE = "pruning_report.json"
