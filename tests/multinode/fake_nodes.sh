# Two fake nodes on this machine (sourced by tests/multinode/run.sh; needs root): network
# namespaces $NS_A and $NS_B, each with its own interface (a veth pair between them, addresses
# $ADDR_A and $ADDR_B, named "uly0" inside), its own /etc/hosts naming both nodes (ip netns exec
# mounts /etc/netns/NS/hosts over /etc/hosts), and its own host name for what runs there
# (`on_node`: a UTS namespace per command). Everything made here is removed by `fake_nodes_down`.
NODE_A=node-a
NODE_B=node-b
NS_A="uly$$a"
NS_B="uly$$b"
ADDR_A=10.231.7.1
ADDR_B=10.231.7.2

fake_nodes_up() {
  ip netns add "$NS_A"
  ip netns add "$NS_B"
  ip link add "uv$$a" type veth peer name "uv$$b"
  ip link set "uv$$a" netns "$NS_A"
  ip link set "uv$$b" netns "$NS_B"
  local ns dev addr
  for ns_dev_addr in "$NS_A uv$$a $ADDR_A" "$NS_B uv$$b $ADDR_B"; do
    read -r ns dev addr <<<"$ns_dev_addr"
    ip -n "$ns" link set "$dev" name uly0
    ip -n "$ns" addr add "$addr/24" dev uly0
    ip -n "$ns" link set uly0 up
    ip -n "$ns" link set lo up
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$ADDR_A" "$NODE_A" "$ADDR_B" "$NODE_B" > "/etc/netns/$ns/hosts"
  done
}

# Ends every process left in the namespaces, then removes them and their files.
fake_nodes_down() {
  local ns
  for ns in "$NS_A" "$NS_B"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
  sleep 0.5
  for ns in "$NS_A" "$NS_B"; do
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
}

ns_of() {
  case "$1" in
    "$NODE_A" | "$ADDR_A") echo "$NS_A" ;;
    "$NODE_B" | "$ADDR_B") echo "$NS_B" ;;
    *) echo "no fake node $1" >&2; return 1 ;;
  esac
}

# The host's cgroup mounts as shell commands (each ending in "&&"), to replay in a node before a
# daemon that needs them (slurmd): ip netns exec mounts the namespace's own /sys, without them.
cgroup_mounts() {
  awk '$2 ~ "^/sys/fs/cgroup" { printf "mkdir -p %s && mount -t %s -o %s %s %s && ", $2, $3, $4, $3, $2 }' /proc/self/mounts
}

# on_node NODE CMD...: runs CMD on NODE (its network namespace, with its host name).
on_node() {
  local node="$1" ns
  ns="$(ns_of "$node")" || return 1
  shift
  ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$node" "$@"
}
