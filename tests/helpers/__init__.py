"""What several test files share: tiny corpora, configs and models, child-process launches, fault injection.

Test files import from here (``from helpers.pretrain_data import tiny_config``), never from each other.
``tests/`` is on ``sys.path`` under pytest because ``tests/conftest.py`` lives there (rootdir-relative imports).
"""
