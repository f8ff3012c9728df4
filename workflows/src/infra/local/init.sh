#!/bin/bash
# The init of one local container (written by orrery's local provider).
#
# Runs as PID 1 of the container's PID namespace, already inside its network
# namespace and in fresh mount and UTS namespaces:
#   unshare --mount --uts --pid --fork --kill-child /bin/bash init.sh <state dir> <hostname>
# It mounts a copy-on-write view of the host's root file system (overlayfs,
# lowerdir=/, upper and work dirs in the state dir), gives it its own /proc,
# /sys, /dev, /run and /tmp, hides the containers' state root, switches root
# (pivot_root), sets the hostname and runs sshd in the foreground. Killing
# this process (or its launcher, thanks to --kill-child) ends the container:
# the kernel kills everything else in the PID namespace.
set -euo pipefail

dir=$1
name=$2
state_root=$(dirname "$dir")
root=$dir/root

mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=/,upperdir=$dir/upper,workdir=$dir/work" "$root"

mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys" || echo "init: no sysfs (continuing)" >&2

# A minimal /dev: a few host devices, a private devpts, its own shm.
mount -t tmpfs -o mode=755,size=1m tmpfs "$root/dev"
for dev in null zero full random urandom tty; do
    touch "$root/dev/$dev"
    mount --bind "/dev/$dev" "$root/dev/$dev"
done
mkdir -p "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"

mount -t tmpfs -o mode=755 tmpfs "$root/run"
mkdir -p "$root/run/sshd" "$root/run/lock"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"

# Other containers' files are in the lower layer: hide them.
if [ -d "$root$state_root" ]; then
    mount -t tmpfs -o mode=700,size=64k tmpfs "$root$state_root"
fi

hostname "$name"

cd "$root"
pivot_root . .
umount -l .
cd /

/usr/sbin/sshd -D -e -f /etc/ssh/orrery/sshd_config &
sshd=$!
echo "init: container $name up, sshd pid $sshd"
# As PID 1, bash also reaps the orphans of whatever runs in the container.
status=0
wait "$sshd" || status=$?
echo "init: sshd exited with $status" >&2
