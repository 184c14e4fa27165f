import sys

from ulm.cli import main

sys.exit(main())
