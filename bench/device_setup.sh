#!/bin/bash
# On a device machine, in this checkout (carried as .gpuwt beside .whl and .usite.tgz):
# the wheels the image lacks into /tmp/site, and the Alpaca sample (copied to _data/ for the
# call) where tests/conftest.py and bench/models.py look for it (../shared/datasets). Then: export PYTHONPATH=/tmp/site
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl
if [ -f _data/alpaca_data_cleaned.json ]; then
  mkdir -p ../shared/datasets/alpaca_sample && cp _data/alpaca_data_cleaned.json ../shared/datasets/alpaca_sample/
fi
