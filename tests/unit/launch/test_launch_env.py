"""dist_env(): torchrun, Slurm and single-process environments, and Slurm hostlist expansion."""

from __future__ import annotations

import pytest

from megatron_oreal.launch.env import DistEnv, dist_env, expand_nodelist, parse_tasks_per_node, slurm_port


def test_single_process_is_a_world_of_one():
    assert dist_env({}) == DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "node7", "MASTER_PORT": "29411"}  # fmt: skip
    assert dist_env(env) == DistEnv(5, 8, 1, "node7", 29411, "torchrun", local_world_size=4, node_rank=1, num_nodes=2)


def test_torchrun_under_srun_prefers_torchrun_ranks():
    # torchrun launched by srun: SLURM_PROCID is the per-node launcher, RANK the worker.
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    got = dist_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (3, 4, 1, "torchrun")


def test_slurm_variables_parse_nodelist_and_derive_port():
    env = {
        "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[03-05,07]", "SLURM_JOB_ID": "123456", "SLURM_NNODES": "4",
        "SLURM_TASKS_PER_NODE": "2(x4)",
    }  # fmt: skip
    got = dist_env(env)
    # 123456 % 20000 = 3456 -> port 23456; the first node of gpu[03-05,07] is gpu03.
    assert got == DistEnv(5, 8, 1, "gpu03", 23456, "slurm", local_world_size=2, node_rank=2, num_nodes=4)


def test_slurm_exported_rendezvous_wins_and_uneven_tasks_per_node():
    env = {
        "SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "3",
        "SLURM_JOB_NODELIST": "a[1-4]", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_STEP_NUM_NODES": "4",
        "MASTER_ADDR": "a1-ib", "MASTER_PORT": "31000",
    }  # fmt: skip
    got = dist_env(env)
    assert (got.master_addr, got.master_port, got.local_world_size, got.num_nodes) == ("a1-ib", 31000, 1, 4)


def test_slurm_without_tasks_per_node_assumes_even_spread():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "n1,n2"}  # fmt: skip
    got = dist_env(env)
    assert (got.local_world_size, got.master_addr, got.master_port) == (2, "n1", 20000)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[03-05,07]", ["gpu03", "gpu04", "gpu05", "gpu07"]),
        ("gpu[03-05,07],cpu1", ["gpu03", "gpu04", "gpu05", "gpu07", "cpu1"]),
        ("vm", ["vm"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding in, none out
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # padding kept to the first bound's width
        ("rack[1-2]-gpu[1,3]", ["rack1-gpu1", "rack1-gpu3", "rack2-gpu1", "rack2-gpu3"]),
        ("a[1-2],b[5],c", ["a1", "a2", "b5", "c"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[03-05", "gpu]1[", "gpu[a-b]", "gpu[5-3]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="SLURM nodelist"):
        expand_nodelist(bad)


def test_tasks_per_node_and_port_rule():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    assert slurm_port(7) == 20007 and slurm_port(40007) == 20007


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside world size 2"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two'"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2(y3)"}, "SLURM_TASKS_PER_NODE"),
    ],
)
def test_bad_variables_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dist_env(env)
