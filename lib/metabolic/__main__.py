import sys

from metabolic.cli import main

sys.exit(main())
