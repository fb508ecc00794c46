"""``python -m jaxcomp``: see `jaxcomp.cli.main`."""

from jaxcomp.cli.main import run

if __name__ == "__main__":
  run()
