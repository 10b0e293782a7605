import sys

from dynprune.fl.cli import main

sys.exit(main())
