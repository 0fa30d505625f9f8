"""`python -m workflow_scripts.bench`: the benchmark CLI (`workflow_scripts.bench.benchmark`)."""

import sys

from workflow_scripts.bench.benchmark import main

sys.exit(main())
