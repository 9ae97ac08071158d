import sys

from dtfd.worker import main

sys.exit(main())
