#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
log() { echo "sistemo-init: $*"; }
fail() { log "FATAL: $*"; exit 1; }
[ -f /sistemo/config.env ] || fail "no machine config in the initramfs"
. /sistemo/config.env
# The vsock transport only where the VMM offers the device.
for m in /lib/modules/*.ko; do
  case "$m" in *vsock*) [ "$SISTEMO_VSOCK" = 1 ] || continue ;; esac
  insmod "$m" || log "insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 1000 ]; do usleep 10000; i=$((i+1)); done
[ -b /dev/vda ] || fail "no root disk /dev/vda"
mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount /dev/vda as ext4"
R=/newroot
# An image that runs one program (an OCI image's entrypoint) brings its workload in the machine
# config; any other image must have an init.
if [ ! -f /sistemo/workload.json ]; then
  [ -e $R/sbin/init ] || [ -L $R/sbin/init ] || fail "the image has no /sbin/init"
fi
mkdir -p $R/etc $R/root/.ssh $R/etc/ssh $R/etc/systemd/network
echo "$SISTEMO_HOSTNAME" > $R/etc/hostname
# The kernel's too: commands may run before the image's init sets it from /etc/hostname.
hostname "$SISTEMO_HOSTNAME"
printf '127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost ip6-localhost ip6-loopback\n' "$SISTEMO_HOSTNAME" > $R/etc/hosts
echo "$SISTEMO_MACHINE_ID" > $R/etc/machine-id
# A template gets no network identity: its clones get theirs from the agent.
[ "$SISTEMO_TEMPLATE" = 1 ] || {
  echo "[Match]"
  echo "MACAddress=$SISTEMO_MAC"
  echo "[Network]"
  echo "Address=$SISTEMO_ADDRESS"
  echo "Gateway=$SISTEMO_GATEWAY"
  for d in $SISTEMO_DNS; do echo "DNS=$d"; done
  echo "LinkLocalAddressing=no"
  echo "IPv6AcceptRA=no"
  echo "KeepConfiguration=static"
} > $R/etc/systemd/network/10-sistemo.network
rm -f $R/etc/resolv.conf
for d in $SISTEMO_DNS; do echo "nameserver $d"; done > $R/etc/resolv.conf
chmod 700 $R/root/.ssh
cp /sistemo/authorized_keys $R/root/.ssh/authorized_keys
chmod 600 $R/root/.ssh/authorized_keys
rm -f $R/etc/ssh/ssh_host_*
cp /sistemo/ssh_host_ed25519_key /sistemo/ssh_host_ed25519_key.pub $R/etc/ssh/
chmod 600 $R/etc/ssh/ssh_host_ed25519_key
chmod 644 $R/etc/ssh/ssh_host_ed25519_key.pub
# The network is up before the image's init runs: nothing in the guest has to wait for it.
IF=""
i=0
while [ -z "$IF" ] && [ $i -lt 500 ]; do
  for d in /sys/class/net/*; do
    [ "$(cat $d/address 2>/dev/null)" = "$SISTEMO_MAC" ] && IF=${d##*/}
  done
  [ -n "$IF" ] || { usleep 10000; i=$((i+1)); }
done
[ -n "$IF" ] || fail "no network interface with MAC $SISTEMO_MAC"
ip link set lo up
# No IPv6 autoconfiguration from whatever another machine advertises: sistemo offers no IPv6 yet.
for k in all default "$IF"; do
  echo 0 > /proc/sys/net/ipv6/conf/$k/accept_ra 2>/dev/null
  echo 0 > /proc/sys/net/ipv6/conf/$k/autoconf 2>/dev/null
done
if [ "$SISTEMO_TEMPLATE" != 1 ]; then
  ip link set dev "$IF" up
  ip addr add "$SISTEMO_ADDRESS" dev "$IF" || fail "cannot set address $SISTEMO_ADDRESS"
  ip route add default via "$SISTEMO_GATEWAY" proto static || log "no default route via $SISTEMO_GATEWAY"
  # Tell the bridge about our MAC at once (a previous machine may have had this address).
  arping -U -c 1 -w 1 -I "$IF" "${SISTEMO_ADDRESS%/*}" >/dev/null 2>&1 &
fi
# sistemo volumes: mount each volume with a mount point ($SISTEMO_VOLUMES: SERIAL:MOUNT:ro|rw),
# found by its disk's serial, whatever its position among vdb, vdc, ...
for v in $SISTEMO_VOLUMES; do
  serial=${v%%:*}; rest=${v#*:}; mnt=${rest%:*}; mode=${rest##*:}; dev=""; i=0
  while [ -z "$dev" ] && [ $i -lt 500 ]; do
    for s in /sys/block/vd*/serial; do
      [ "$(cat "$s" 2>/dev/null)" = "$serial" ] && { d=${s%/serial}; dev=/dev/${d##*/}; }
    done
    [ -n "$dev" ] || { usleep 10000; i=$((i+1)); }
  done
  [ -n "$dev" ] || { log "volume $serial: no disk with that serial"; continue; }
  opts=rw; [ "$mode" = ro ] && opts=ro,noload
  mkdir -p "$R$mnt" && mount -t ext4 -o "$opts,noatime" "$dev" "$R$mnt" || log "volume $serial: cannot mount $dev on $mnt"
done
# The guest agent (exec, shell, cp, readiness): started now, chrooted into the image, so the
# host can reach it before the image's init has started anything. It lives on a tmpfs /run,
# which the image's init keeps (systemd leaves an existing /run mount alone): nothing is written
# to the image.
[ -f /sistemo/workload.json ] && mkdir -p $R/run $R/dev $R/proc $R/sys
mount -t tmpfs -o mode=0755,nosuid,nodev,size=20% tmpfs $R/run || fail "cannot mount a tmpfs on /run"
mkdir -p $R/run/sistemo/bin
cp /sistemo/agent $R/run/sistemo/agent || fail "cannot install the guest agent"
# Sessions started while the image's init starts find this systemctl first: it waits for
# systemd to take commands, then runs the image's own (see sistemo_agent::early); any user may
# run it (the agent holds no secret and no privilege of its own).
chmod 755 $R/run/sistemo/agent
ln -s ../agent $R/run/sistemo/bin/systemctl
# Tells the agent to serve vsock too (without the transport, its socket() would make the kernel
# run modprobe for it in the middle of the boot).
[ "$SISTEMO_VSOCK" = 1 ] && : > $R/run/sistemo/vsock
PORT=""
i=0
while [ -z "$PORT" ] && [ $i -lt 500 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = sistemo.agent ] && PORT=/dev/${p##*/}
  done
  [ -n "$PORT" ] || { usleep 10000; i=$((i+1)); }
done
[ -n "$PORT" ] || fail "no virtio-serial port named sistemo.agent"
log "switching to the root filesystem"
# Terminals and shared memory for sessions that run before the image's init mounts them (it
# keeps these, with the options it would have used).
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,mode=620,gid=5,ptmxmode=666 devpts /dev/pts || log "cannot mount /dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm || log "cannot mount /dev/shm"
# /dev, /proc and /sys move into the image (its init keeps mounted ones, as after any initramfs).
for m in dev proc sys; do mount --move /$m $R/$m || fail "cannot move /$m into the image"; done
chroot $R /run/sistemo/agent --port "$PORT" &
# switch_root moves $R: the agent must have entered it first (it writes its pid once it has).
i=0
while [ ! -e $R/run/sistemo/agent.pid ] && [ $i -lt 500 ]; do usleep 2000; i=$((i+1)); done
[ -e $R/run/sistemo/agent.pid ] || log "the guest agent did not start"
# The workload's image: the agent becomes PID 1 and runs the program (see sistemo_agent::init).
if [ -f /sistemo/workload.json ]; then
  cp /sistemo/workload.json $R/run/sistemo/workload.json || fail "cannot install the workload"
  exec switch_root $R /run/sistemo/agent --init --port "$PORT"
fi
exec switch_root $R /sbin/init
