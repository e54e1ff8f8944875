"""``python -m bloodcell.clean``: see bloodcell.clean.cli."""

from bloodcell.clean.cli import main

if __name__ == "__main__":
    main()
