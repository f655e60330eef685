#!/bin/sh
# The body of a job array: part K of N of a merge, K given by the scheduler (docs/CLUSTER.md).
#
#   merge-part.sh N OUT MERGE-ARGUMENTS...
#
# K is $SLURM_ARRAY_TASK_ID (a Slurm job array, --array=0-(N-1)) or $JOB_COMPLETION_INDEX (a
# Kubernetes Indexed Job, completions: N). Every part writes its shards of OUT into OUT.parts/;
# once all N have succeeded, `sotu-delta finalize OUT` puts them together. $SOTU_DELTA names the
# binary (default: sotu-delta on the PATH).
set -eu
if [ $# -lt 3 ]; then
    echo "usage: merge-part.sh N OUT MERGE-ARGUMENTS..." >&2
    exit 2
fi
n=$1
out=$2
shift 2
k=${SLURM_ARRAY_TASK_ID:-${JOB_COMPLETION_INDEX:-}}
if [ -z "$k" ]; then
    echo "merge-part.sh: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set: run it as a job array's task" >&2
    exit 2
fi
exec "${SOTU_DELTA:-sotu-delta}" merge --part "$k/$n" -o "$out" "$@"
