import sys

from streaming.sim.cli import main

sys.exit(main())
