#!/usr/bin/env bash
# Build learn2learn 0.2.0 from its PyPI sdist into the given virtualenv.
#
# The sdist ships Cython-generated C that includes CPython's private `longintrepr.h`, which no longer
# exists on Python 3.11, so `pip install learn2learn` fails. We regenerate the C from the shipped
# .pyx/.pxd sources with Cython < 3, build the extensions, and install without pulling its optional
# extras (gsutil, qpth), which metabench does not use.
set -euo pipefail
venv=$(cd "${1:?usage: install_learn2learn.sh VENV}" && pwd)
py="$venv/bin/python"
version=0.2.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$py" -m pip install -q "cython<3"
"$py" -m pip download -q --no-deps --no-build-isolation --no-binary learn2learn "learn2learn==$version" -d "$work"
tar -xzf "$work/learn2learn-$version.tar.gz" -C "$work"
src="$work/learn2learn-$version"
# Newer sources than the shipped .c files make setup.py's cythonize regenerate them.
find "$src/learn2learn" -name '*.pyx' -o -name '*.pxd' | xargs touch
rm -f $(find "$src/learn2learn" -name '*.pyx' | sed 's/\.pyx$/.c/')
(cd "$src" && "$py" setup.py -q build_ext)
"$py" -m pip install -q --no-deps --no-build-isolation "$src"
"$py" -c "import learn2learn; print('learn2learn', learn2learn.__version__)"
