import sys

from recoveryd import main

sys.exit(main())
