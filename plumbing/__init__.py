"""Everything that is not the paper: building the data set, image features, the built-in sample,
run folders and checkpoints, several processes, the BERT loader, the benchmark and pictures.

The paper is in the files beside this folder (sancl.py, probe_mask.py, data.py, train.py,
evaluate.py); they call into these modules where a run needs plumbing. Each module here runs
from the repository root as `python -m plumbing.NAME` where it has a command line.
"""
