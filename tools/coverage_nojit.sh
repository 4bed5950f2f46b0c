#!/usr/bin/env bash
# Coverage of the kernel code: run the test suite with NUMBA_DISABLE_JIT=1, so every
# @njit kernel runs as plain Python that coverage.py can trace, and print the report of
# the fastsce package (configuration in pyproject.toml, [tool.coverage.*]).
#
#   tools/coverage_nojit.sh                      # the whole suite (~20 min on 2 cores)
#   tools/coverage_nojit.sh tests/test_loss.py   # any pytest arguments
#
# Prints the whole package, then the kernel modules alone (the code that is compiled
# when the JIT is on, plus the wrappers that dispatch to it). Exits with pytest's status.
# Subprocesses are not traced (most of them run compiled kernels on purpose).
set -uo pipefail
cd "$(dirname "$0")/.."

export NUMBA_DISABLE_JIT=1
KERNELS="fastsce/_kernels/*,fastsce/_math.py,fastsce/_layout.py,fastsce/_validation.py,fastsce/softmax.py,fastsce/loss.py"

python -m coverage erase
python -m coverage run -m pytest -q -p no:cacheprovider "${@:-tests}"
status=$?

echo
echo "== fastsce, whole package (NUMBA_DISABLE_JIT=1)"
python -m coverage report
echo
echo "== kernel modules"
python -m coverage report --include="$KERNELS"
exit $status
