import sys

from radlens.cli import main

sys.exit(main())
