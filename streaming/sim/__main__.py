import sys

from crystal.streaming.sim.cli import main

sys.exit(main())
