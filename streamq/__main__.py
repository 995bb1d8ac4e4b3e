import sys

from streamq.cli import main

sys.exit(main())
