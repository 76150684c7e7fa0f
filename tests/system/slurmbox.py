"""A one-node Slurm cluster inside a booted box, set up as ../shared/SLURM.md measured.

Debian's slurmctld, slurmd, slurm-client and munge are installed on the host
(tests/run; their units are left disabled there) and the box's overlay sees
them. `start_cluster` writes slurm.conf, cgroup.conf and gres.conf with ports
of this run's own (a box shares the host's network), makes two fake GPU
device nodes, and starts munge, slurmctld and slurmd under the box's systemd.
"""

from __future__ import annotations

import random
import shutil
import socket
import time

from box import Box

NODE_CPUS = 8  # fake CPUs (SlurmdParameters=config_overrides): jobs do not queue on 2 cores
GPUS = 2


def slurm_installed() -> str | None:
    """Why a cluster cannot run here, or None when the packages are installed."""
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin") is None:
            return f"{tool} is not installed (tests/run installs slurmctld, slurmd, munge)"
    return None


def _free_port_pair() -> tuple[int, int]:
    """Two consecutive ports nobody listens on now (slurmctld's, slurmd's)."""
    for _ in range(50):
        base = random.randrange(20000, 40000)
        ok = True
        for port in (base, base + 1):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return base, base + 1
    raise RuntimeError("no free port pair for Slurm")


def slurm_conf(ctld_port: int, slurmd_port: int) -> str:
    """slurm.conf for a one-node cluster with fake GPUs, per SLURM.md."""
    return f"""\
ClusterName=tsdtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
SchedulerParameters=batch_sched_delay=0
DependencyParameters=kill_invalid_depend
MinJobAge=300
KillWait=2
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=localhost CPUs={NODE_CPUS} RealMemory=4000 Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


CGROUP_CONF = "CgroupPlugin=cgroup/v1\n"
GRES_CONF = (
    "AutoDetect=off\n"
    f"NodeName=localhost Name=gpu File=/run/fakegpu/nvidia[0-{GPUS - 1}]\n"
)


def start_cluster(box: Box, timeout: float = 30.0) -> tuple[int, int]:
    """Configure and start munge, slurmctld and slurmd in `box`; wait for the node to be idle."""
    ctld, slurmd = _free_port_pair()
    box.write_file("/etc/slurm/slurm.conf", slurm_conf(ctld, slurmd))
    box.write_file("/etc/slurm/cgroup.conf", CGROUP_CONF)
    box.write_file("/etc/slurm/gres.conf", GRES_CONF)
    box.write_file("/etc/default/slurmd", 'SLURMD_OPTIONS="-N localhost"\n')
    box.run(
        "mkdir -p /run/fakegpu /var/spool/slurmctld /var/spool/slurmd /var/log/slurm && "
        + " && ".join(
            f"mknod -m 666 /run/fakegpu/nvidia{i} c 1 3" for i in range(GPUS)
        )
    )
    box.systemctl("start", "munge", "slurmctld", "slurmd")
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        r = box.run(["sinfo", "-h", "-o", "%T"], check=False)
        state = r.stdout.strip()
        if r.returncode == 0 and state in ("idle", "mixed"):
            return ctld, slurmd
        time.sleep(0.2)
    log = box.run("tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log",
                  check=False).stdout
    raise RuntimeError(f"the Slurm node did not come up (state {state!r}):\n{log}")
