import sys

from pixart.cli import main

sys.exit(main())
