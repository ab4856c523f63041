import sys

from llmcc.cli import main

sys.exit(main())
