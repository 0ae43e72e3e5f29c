import sys

from deadend.cli import main

sys.exit(main())
