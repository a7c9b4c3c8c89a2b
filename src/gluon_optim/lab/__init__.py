"""The lab: models, offline data, a training loop and the ``gluon-optim`` command line.

The lab uses only the library's public API; the library never imports the lab.
"""
