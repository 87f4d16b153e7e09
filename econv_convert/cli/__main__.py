"""``python -m econv_convert.cli``: the command line."""

from econv_convert.cli import main

main()
