"""fs_zammad: FreeSWITCH calls in Zammad's caller log, live."""

__version__ = "0.1.0"
