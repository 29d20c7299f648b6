"""``python -m trl_multiadapter`` runs the ``trl-multiadapter`` command line."""

from trl_multiadapter.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
