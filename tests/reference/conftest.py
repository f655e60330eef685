"""pytest configuration of the reference tests.

numpy's BLAS/LAPACK (used by the iso/tsv reference, test_methods.py) would start one thread per
core for the small matrices of the fixtures, which is slower than one thread, and much slower on
a shared machine. The variables must be set before numpy is first imported, hence here.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
