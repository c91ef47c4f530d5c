import sys

from lmloop.cli import main

sys.exit(main())
