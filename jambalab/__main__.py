import sys

from jambalab.cli import main

sys.exit(main())
