"""``python -m r3v.train``: run a training job (see ``r3v.train.job``)."""

from r3v.train.job import main

main()
