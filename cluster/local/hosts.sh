#!/usr/bin/env bash
# Separate network hosts on one Linux machine: each a network namespace with a hostname of its
# own (a UTS namespace) and an address on a private bridge; the file system stays shared. For
# trying and testing multi-host Ray and Slurm without a second machine.
#
#   cluster/local/hosts.sh up SET N        # hosts SET-h1..SET-hN; prints "SET-hI ADDRESS HOSTNAME"
#   cluster/local/hosts.sh exec HOST CMD... # run CMD on HOST (its network and hostname)
#   cluster/local/hosts.sh link HOST up|down  # plug HOST's cable in or pull it out
#   cluster/local/hosts.sh down SET        # stop every process on SET's hosts, remove it all
#   cluster/local/hosts.sh check SET       # exit 1 (and say what) if anything of SET is left
#   cluster/local/hosts.sh list            # the sets that exist
#
# SET is "ptft" and 1-8 lowercase letters or digits (e.g. ptftdemo): every namespace, interface
# and mount this script makes carries it. Layout of a set:
#   SET-sw   a namespace holding the bridge br0 (the "switch"); one veth per host plugs into it
#   SET-hI   host I: interface eth0 with 10.213.K.I/24 (K picked so that the subnet is free on
#            this machine), loopback, hostname SET-hI, and (bind-mounted for what `exec` runs)
#            an /etc/hosts that names every host of the set and an empty /etc/resolv.conf
# The hosts have no default route: they reach each other and their own loopback, nothing else.
# The machine's own network namespace is not changed (no interface, route or address is added),
# so a host cannot reach this machine's services either, and this machine reaches a host only
# through `exec`. State lives in /run/ptft-hosts/SET; needs root.
set -euo pipefail

STATE_ROOT=/run/ptft-hosts
die() { echo "hosts.sh: $*" >&2; exit 1; }

check_set_name() {
    [[ "$1" =~ ^ptft[a-z0-9]{1,8}$ ]] || die "set name '$1' must be 'ptft' and 1-8 lowercase letters or digits"
}
need_root() { [[ $(id -u) -eq 0 ]] || die "network namespaces need root"; }

# A /24 in 10.213.0.0/16 that no route of this machine and no other set uses.
pick_subnet() {
    local k used
    used="$(cat "$STATE_ROOT"/*/subnet 2>/dev/null || true)"
    for k in $(shuf -i 1-254); do
        grep -qx "10.213.$k" <<<"$used" && continue
        { ip -4 route show table all; ip -4 addr; } | grep -q "10\.213\.$k\." && continue
        echo "10.213.$k"
        return 0
    done
    die "no free /24 in 10.213.0.0/16"
}

up() {
    local set="$1" n="$2" dir subnet i host
    check_set_name "$set"
    need_root
    [[ "$n" =~ ^[1-9]$ ]] || die "number of hosts must be 1-9, not '$n'"
    dir="$STATE_ROOT/$set"
    [[ ! -e "$dir" ]] || die "set $set exists ($dir); remove it with '$0 down $set'"
    mkdir -p "$dir"
    # From here on, a failure removes what was made.
    trap 'down "$set" >/dev/null 2>&1 || true' ERR
    subnet="$(pick_subnet)"
    echo "$subnet" >"$dir/subnet"
    ip netns add "$set-sw"
    ip -n "$set-sw" link add br0 type bridge
    ip -n "$set-sw" link set br0 up
    ip -n "$set-sw" link set lo up
    # the hosts' /etc/hosts, and an empty resolv.conf: no DNS
    : >"$dir/etc-hosts"
    : >"$dir/resolv.conf"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >>"$dir/etc-hosts"
    for i in $(seq 1 "$n"); do printf '%s.%s\t%s-h%s\n' "$subnet" "$i" "$set" "$i" >>"$dir/etc-hosts"; done
    for i in $(seq 1 "$n"); do
        host="$set-h$i"
        ip netns add "$host"
        # the cable: eth0 on the host, ${set}p$i on the switch
        ip link add eth0 netns "$host" type veth peer name "${set}p$i" netns "$set-sw"
        ip -n "$set-sw" link set "${set}p$i" master br0 up
        ip -n "$host" addr add "$subnet.$i/24" dev eth0
        ip -n "$host" link set eth0 up
        ip -n "$host" link set lo up
        # hostname: a UTS namespace kept by a bind mount
        touch "$dir/h$i.uts"
        unshare --uts="$dir/h$i.uts" hostname "$host"
        echo "$host $subnet.$i" >>"$dir/hosts"
    done
    trap - ERR
    while read -r host addr; do echo "$host $addr $host"; done <"$dir/hosts"
}

host_dir() {
    local host="$1" set
    set="${host%-h*}"
    [[ "$host" =~ ^ptft[a-z0-9]{1,8}-h[1-9]$ ]] || die "'$host' is not a host name (SET-hI)"
    [[ -d "$STATE_ROOT/$set" ]] || die "no host set $set"
    echo "$STATE_ROOT/$set"
}

exec_on() {
    local host="$1" dir
    shift
    dir="$(host_dir "$host")"
    [[ $# -gt 0 ]] || die "exec: no command"
    # The host's network and hostname; a mount namespace of its own for its /etc/hosts and
    # /etc/resolv.conf (the rest of the file system, /sys and cgroups included, is the machine's).
    # shellcheck disable=SC2016
    exec nsenter --net="/run/netns/$host" --uts="$dir/h${host##*-h}.uts" -- \
        unshare --mount --propagation slave -- /bin/sh -c \
        'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"' \
        sh "$dir/etc-hosts" "$dir/resolv.conf" "$@"
}

link() {
    local host="$1" state="$2" set
    host_dir "$host" >/dev/null
    set="${host%-h*}"
    [[ "$state" == up || "$state" == down ]] || die "link: up or down, not '$state'"
    # pulled out at the switch end, as a cable would be; the host still sees its own eth0
    ip -n "$set-sw" link set "${set}p${host##*-h}" "$state"
}

# Every process whose network namespace is one of the set's.
set_pids() {
    local set="$1" ns
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$set-(sw|h[1-9])$" || true); do
        ip netns pids "$ns" 2>/dev/null || true
    done
}

down() {
    local set="$1" dir pids ns f
    check_set_name "$set"
    need_root
    dir="$STATE_ROOT/$set"
    pids="$(set_pids "$set" | sort -u)"
    if [[ -n "$pids" ]]; then
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z "$(set_pids "$set")" ]] && break
            sleep 0.2
        done
        pids="$(set_pids "$set" | sort -u)"
        # shellcheck disable=SC2086
        [[ -z "$pids" ]] || kill -KILL $pids 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z "$(set_pids "$set")" ]] && break
            sleep 0.2
        done
    fi
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$set-(sw|h[1-9])$" || true); do
        ip netns del "$ns"
    done
    for f in "$dir"/h*.uts; do
        [[ -e "$f" ]] || continue
        umount "$f" 2>/dev/null || true
    done
    rm -rf "$dir"
    check "$set"
}

check() {
    local set="$1" left=()
    check_set_name "$set"
    [[ -z "$(ip netns list | awk '{print $1}' | grep -E "^$set-" || true)" ]] || left+=("namespaces: $(ip netns list | grep -E "^$set-" | tr '\n' ' ')")
    [[ -z "$(ip -o link show | grep -F "$set" || true)" ]] || left+=("interfaces in the machine's namespace")
    [[ ! -e "$STATE_ROOT/$set" ]] || left+=("$STATE_ROOT/$set")
    grep -q "$STATE_ROOT/$set/" /proc/self/mountinfo && left+=("UTS mounts under $STATE_ROOT/$set")
    if [[ ${#left[@]} -gt 0 ]]; then
        printf 'hosts.sh: left of %s: %s\n' "$set" "${left[*]}" >&2
        return 1
    fi
    echo "nothing left of $set"
}

list() {
    local d
    for d in "$STATE_ROOT"/*/; do
        [[ -d "$d" ]] || continue
        echo "$(basename "$d") $(cat "$d/subnet").0/24: $(awk '{print $1}' "$d/hosts" 2>/dev/null | tr '\n' ' ')"
    done
}

case "${1:-}" in
    up) [[ $# -eq 3 ]] || die "usage: $0 up SET N"; up "$2" "$3" ;;
    exec) [[ $# -ge 3 ]] || die "usage: $0 exec HOST CMD..."; shift; exec_on "$@" ;;
    link) [[ $# -eq 3 ]] || die "usage: $0 link HOST up|down"; link "$2" "$3" ;;
    down) [[ $# -eq 2 ]] || die "usage: $0 down SET"; down "$2" ;;
    check) [[ $# -eq 2 ]] || die "usage: $0 check SET"; check "$2" ;;
    list) list ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
