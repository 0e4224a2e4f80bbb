"""Train a potential: `python train.py [--config configs/NAME.yaml] [--resume] [key.sub=value ...]`."""

import sys

from mpnn.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
