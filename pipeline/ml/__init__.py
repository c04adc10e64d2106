"""The ML toolkit, in four rooms, each importing only the rooms below it (tests/unit/test_layering.py):

- :mod:`kdpipe.ml.runtime`: devices, threads and data-parallel processes;
- :mod:`kdpipe.ml.data`: datasets in memory and streamed, recipes, unlabelled images, transfer sets;
- :mod:`kdpipe.ml.models`: the zoo and adapters, body/head splits, weights, teachers and how models fit the data;
- :mod:`kdpipe.ml.train`: the training loop and the data-free generator.
"""
