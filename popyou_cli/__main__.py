"""`python -m popyou_cli ...` runs the CLI: the form for launchers that take a module
(`accelerate launch -m popyou_cli gen-data ...`) and for tests that start a fresh interpreter."""
from popyou_cli.cli.app import main

if __name__ == "__main__":
    main()
