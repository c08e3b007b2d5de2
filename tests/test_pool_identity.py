"""Pool identity: a benchmark option added later (or one only meta-training sees) never splits one task pool."""

from __future__ import annotations

from metarun.scores import comparable_pool

OLD = {"benchmark": "omniglot", "split": "test", "pool_seed": 0, "tasks": 600,
       "settings": {"ways": 5, "shots": 1, "queries": 15, "split_scheme": "vinyals", "image_size": 28,
                    "rotations": [0, 90, 180, 270], "split_seed": 0}}


def test_a_setting_missing_from_an_older_scores_file_is_the_options_default() -> None:
    new = {**OLD, "settings": {**OLD["settings"], "within_alphabet": False, "augment": None}}
    assert comparable_pool(OLD) == comparable_pool(new)


def test_a_non_default_value_of_a_new_option_is_another_pool() -> None:
    within = {**OLD, "settings": {**OLD["settings"], "within_alphabet": True}}
    assert comparable_pool(OLD) != comparable_pool(within)


def test_training_distortions_do_not_change_the_test_pool() -> None:
    augmented = {**OLD, "settings": {**OLD["settings"], "augment": {"rotation": 10}}}
    assert comparable_pool(OLD) == comparable_pool(augmented)


def test_a_benchmark_of_a_users_own_config_tree_compares_as_written() -> None:
    mine = {**OLD, "benchmark": "my_benchmark"}
    assert comparable_pool(mine)["settings"] == OLD["settings"]
