//! Which rank runs where: the nodes of a job, each node-local rank's GPU, and the switch that lets
//! several ranks share one GPU (`ULYSSES_RANKS_PER_GPU`). Plain functions of plain numbers, so the
//! rules are tested without MPI or a GPU; `Launch` feeds them what MPI and CUDA report.

/// The environment variable of the switch: node-local ranks per GPU (default 1).
pub const RANKS_PER_GPU_VAR: &str = "ULYSSES_RANKS_PER_GPU";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error("{RANKS_PER_GPU_VAR}={value:?} is not a number of ranks per GPU; use a whole number >= 1 (1: one rank per GPU, the default)")]
    BadValue { value: String },
    #[error("no CUDA device is available (torch sees 0 GPUs); the nccl backend needs a GPU (use --backend mpi, or parallel.device = \"cpu\", on CPU)")]
    NoGpu,
    #[error("{local_size} ranks on node {node} but it has {gpus} GPU(s); start at most {gpus} rank(s) per node, or set {RANKS_PER_GPU_VAR}={needed} to run {needed} ranks on each GPU (for correctness checks, never for speed)")]
    TooFewGpus { node: String, local_size: usize, gpus: usize, needed: usize },
    #[error("{RANKS_PER_GPU_VAR}={per_gpu} does not divide the {local_size} ranks on node {node}; use one of {valid}")]
    NotADivisor { node: String, per_gpu: usize, local_size: usize, valid: String },
    #[error("{local_size} ranks on node {node} at {RANKS_PER_GPU_VAR}={per_gpu} need {} GPUs but it has {gpus}; use one of {valid}", local_size / per_gpu)]
    StillTooFewGpus { node: String, per_gpu: usize, local_size: usize, gpus: usize, valid: String },
}

/// `ULYSSES_RANKS_PER_GPU` as set (None: unset or empty, one rank per GPU).
pub fn ranks_per_gpu(value: Option<&str>) -> Result<usize, PlacementError> {
    match value.map(str::trim) {
        None | Some("") => Ok(1),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(PlacementError::BadValue { value: v.to_string() }),
        },
    }
}

/// Where one rank's GPU work goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSlot {
    /// The CUDA ordinal (among the visible GPUs).
    pub gpu: usize,
    /// Ranks of this node on that GPU (1 unless the switch is on).
    pub ranks_per_gpu: usize,
    /// GPUs of the node in use (`local_size / ranks_per_gpu`).
    pub gpus_used: usize,
    /// Which of the ranks sharing the GPU this is (0 .. ranks_per_gpu).
    pub slot: usize,
}

/// The GPU of node-local rank `local_rank` among `local_size` ranks on a node (named `node` in
/// errors) that has `gpus` visible GPUs, `per_gpu` ranks to a GPU: round-robin over the GPUs in
/// use (GPU `local_rank % gpus_used`), exactly `per_gpu` ranks on each.
pub fn gpu_slot(
    node: &str,
    local_rank: usize,
    local_size: usize,
    gpus: usize,
    per_gpu: usize,
) -> Result<GpuSlot, PlacementError> {
    let node = node.to_string();
    if gpus == 0 {
        return Err(PlacementError::NoGpu);
    }
    let divisors = |n: usize| (1..=n).filter(|k| n % k == 0).collect::<Vec<_>>();
    if per_gpu == 1 {
        if local_size > gpus {
            return Err(PlacementError::TooFewGpus { node, local_size, gpus, needed: local_size.div_ceil(gpus) });
        }
        return Ok(GpuSlot { gpu: local_rank, ranks_per_gpu: 1, gpus_used: local_size, slot: 0 });
    }
    // Values of the switch that place this node's ranks evenly on at most `gpus` GPUs.
    let valid = || {
        let ok: Vec<String> =
            divisors(local_size).into_iter().filter(|k| local_size / k <= gpus).map(|k| k.to_string()).collect();
        ok.join(", ")
    };
    if local_size % per_gpu != 0 {
        return Err(PlacementError::NotADivisor { node, per_gpu, local_size, valid: valid() });
    }
    let gpus_used = local_size / per_gpu;
    if gpus_used > gpus {
        return Err(PlacementError::StillTooFewGpus { node, per_gpu, local_size, gpus, valid: valid() });
    }
    Ok(GpuSlot { gpu: local_rank % gpus_used, ranks_per_gpu: per_gpu, gpus_used, slot: local_rank / gpus_used })
}

/// The NCCL host identity of a rank sharing its GPU: NCCL refuses two ranks of one host on one
/// GPU ("duplicate GPU"), but ranks of different hosts may use the same device, their traffic then
/// going over NCCL's network transport. Ranks of one slot (one per GPU) keep one identity, so
/// they still see each other as one host with several GPUs.
pub fn nccl_host_id(machine: &str, slot: usize) -> String {
    format!("{machine}-ulysses-slot{slot}")
}

/// Where every world rank of a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// Per world rank: the world rank of the first rank of its MPI node (its node id).
    pub node_of: Vec<usize>,
    /// Per world rank: its host name.
    pub host: Vec<String>,
    /// Per world rank: what tells machines apart (host name and kernel boot id): two MPI nodes
    /// on one machine have the same.
    pub machine: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NodesError {
    #[error("host {host} is named more than once in the host list or hostfile: MPI made {count} nodes of it (world ranks {ranks}), and each would take the host's GPUs as its own; name each host once with its rank count (`-hosts {host}:N`, or `{host}:N` in the hostfile), and set {RANKS_PER_GPU_VAR} to share its GPUs on purpose")]
    HostTwice { host: String, count: usize, ranks: String },
    #[error("parallel.sp = {sp} puts world ranks {first}..{last} in one SP group, but they lie on {nodes} nodes ({holders}); an SP group must stay on one node (its all-to-alls carry the most traffic): use parallel.sp = one of {valid} (the divisors of the {per_node} ranks per node), with dp = world / sp")]
    SpSpansNodes { sp: usize, first: usize, last: usize, nodes: usize, holders: String, valid: String, per_node: usize },
}

impl Nodes {
    /// The nodes in the order of their first rank: (node's host name, its world ranks).
    pub fn list(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(usize, String, Vec<usize>)> = Vec::new();
        for (rank, &node) in self.node_of.iter().enumerate() {
            match out.iter_mut().find(|(id, _, _)| *id == node) {
                Some((_, _, ranks)) => ranks.push(rank),
                None => out.push((node, self.host[rank].clone(), vec![rank])),
            }
        }
        out.sort_by_key(|(id, _, _)| *id);
        out.into_iter().map(|(_, host, ranks)| (host, ranks)).collect()
    }

    /// One MPI node per machine: a machine named twice in the host list becomes two MPI nodes
    /// whose ranks each count themselves alone on it.
    pub fn check_distinct_machines(&self) -> Result<(), NodesError> {
        let mut machines: Vec<(&str, Vec<usize>, Vec<usize>)> = Vec::new(); // machine, node ids, ranks
        for (rank, machine) in self.machine.iter().enumerate() {
            let node = self.node_of[rank];
            match machines.iter_mut().find(|(m, _, _)| m == machine) {
                Some((_, nodes, ranks)) => {
                    if !nodes.contains(&node) {
                        nodes.push(node);
                    }
                    ranks.push(rank);
                }
                None => machines.push((machine, vec![node], vec![rank])),
            }
        }
        match machines.into_iter().find(|(_, nodes, _)| nodes.len() > 1) {
            None => Ok(()),
            Some((_, nodes, ranks)) => Err(NodesError::HostTwice {
                host: self.host[ranks[0]].clone(),
                count: nodes.len(),
                ranks: ranks_text(&ranks),
            }),
        }
    }

    /// Every SP group (`sp` consecutive world ranks) on one node.
    pub fn check_sp_within_nodes(&self, sp: usize) -> Result<(), NodesError> {
        for group in self.node_of.chunks(sp.max(1)).enumerate() {
            let (g, members) = group;
            let mut held: Vec<usize> = members.to_vec();
            held.dedup();
            if held.len() > 1 {
                let first = g * sp;
                let holders = self
                    .list()
                    .into_iter()
                    .filter(|(_, ranks)| ranks.iter().any(|r| (first..first + members.len()).contains(r)))
                    .map(|(host, ranks)| format!("{host} holds {}", ranks_text(&ranks)))
                    .collect::<Vec<_>>()
                    .join("; ");
                let per_node = self.list().iter().map(|(_, r)| r.len()).min().unwrap_or(1);
                let valid = (1..=per_node)
                    .filter(|k| per_node % k == 0 && self.node_of.len() % k == 0)
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(NodesError::SpSpansNodes {
                    sp,
                    first,
                    last: first + members.len() - 1,
                    nodes: held.len(),
                    holders,
                    valid,
                    per_node,
                });
            }
        }
        Ok(())
    }

    /// One line per node for the start-up printout: `node-a: ranks 0-1 (GPU 0: 0, 1)`.
    pub fn describe(&self, gpu_of: &[Option<usize>]) -> String {
        let mut s = String::new();
        for (host, ranks) in self.list() {
            let gpus = match ranks.iter().map(|&r| gpu_of.get(r).copied().flatten()).collect::<Option<Vec<_>>>() {
                Some(g) => {
                    let mut per_gpu: Vec<(usize, Vec<usize>)> = Vec::new();
                    for (&r, gpu) in ranks.iter().zip(g) {
                        match per_gpu.iter_mut().find(|(x, _)| *x == gpu) {
                            Some((_, rs)) => rs.push(r),
                            None => per_gpu.push((gpu, vec![r])),
                        }
                    }
                    per_gpu.sort();
                    let each: Vec<String> =
                        per_gpu.iter().map(|(gpu, rs)| format!("GPU {gpu}: {}", ranks_text(rs))).collect();
                    format!(" ({})", each.join("; "))
                }
                None => String::new(),
            };
            s.push_str(&format!("{host} holds ranks {}{gpus}\n", ranks_text(&ranks)));
        }
        s
    }
}

/// `0-3`, `0, 2, 5`: consecutive runs written as ranges.
pub fn ranks_text(ranks: &[usize]) -> String {
    let contiguous = ranks.windows(2).all(|w| w[1] == w[0] + 1);
    match ranks {
        [] => String::new(),
        [one] => one.to_string(),
        [first, .., last] if contiguous => format!("{first}-{last}"),
        _ => ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_reads_a_whole_number_of_ranks() {
        assert_eq!(ranks_per_gpu(None), Ok(1));
        assert_eq!(ranks_per_gpu(Some("")), Ok(1));
        assert_eq!(ranks_per_gpu(Some("4")), Ok(4));
        for bad in ["0", "-2", "two", "1.5"] {
            let e = ranks_per_gpu(Some(bad)).unwrap_err();
            assert_eq!(e, PlacementError::BadValue { value: bad.into() });
            assert!(e.to_string().contains(&format!("ULYSSES_RANKS_PER_GPU=\"{bad}\"")), "{e}");
        }
    }

    #[test]
    fn one_rank_per_gpu_takes_the_gpu_of_its_node_local_rank() {
        for r in 0..4 {
            assert_eq!(gpu_slot("n", r, 4, 8, 1).unwrap(), GpuSlot { gpu: r, ranks_per_gpu: 1, gpus_used: 4, slot: 0 });
        }
        let e = gpu_slot("node-a", 0, 4, 1, 1).unwrap_err();
        assert_eq!(e, PlacementError::TooFewGpus { node: "node-a".into(), local_size: 4, gpus: 1, needed: 4 });
        let text = e.to_string();
        assert!(text.contains("4 ranks on node node-a but it has 1 GPU(s)"), "{text}");
        assert!(text.contains("ULYSSES_RANKS_PER_GPU=4"), "{text}");
        assert_eq!(gpu_slot("n", 0, 3, 2, 1).unwrap_err().to_string().contains("ULYSSES_RANKS_PER_GPU=2"), true);
        assert_eq!(gpu_slot("n", 0, 1, 0, 1), Err(PlacementError::NoGpu));
    }

    #[test]
    fn shared_gpus_take_the_ranks_round_robin() {
        // 4 ranks, 2 to a GPU, on a node of 2 GPUs: 0 and 2 on GPU 0, 1 and 3 on GPU 1.
        let slots: Vec<GpuSlot> = (0..4).map(|r| gpu_slot("n", r, 4, 2, 2).unwrap()).collect();
        assert_eq!(slots.iter().map(|s| s.gpu).collect::<Vec<_>>(), [0, 1, 0, 1]);
        assert_eq!(slots.iter().map(|s| s.slot).collect::<Vec<_>>(), [0, 0, 1, 1]);
        assert!(slots.iter().all(|s| s.ranks_per_gpu == 2 && s.gpus_used == 2));
        // All on one GPU, even where the node has more: exactly `per_gpu` ranks on each GPU used.
        let one: Vec<GpuSlot> = (0..4).map(|r| gpu_slot("n", r, 4, 8, 4).unwrap()).collect();
        assert!(one.iter().all(|s| s.gpu == 0 && s.gpus_used == 1));
        assert_eq!(one.iter().map(|s| s.slot).collect::<Vec<_>>(), [0, 1, 2, 3]);
        // Every rank sharing a GPU gets its own NCCL host identity.
        let ids: Vec<String> = one.iter().map(|s| nccl_host_id("m", s.slot)).collect();
        assert!(ids.iter().enumerate().all(|(i, a)| ids[i + 1..].iter().all(|b| a != b)), "{ids:?}");
    }

    #[test]
    fn ranks_per_gpu_must_divide_the_ranks_of_the_node_and_fit_its_gpus() {
        let e = gpu_slot("node-a", 0, 6, 1, 4).unwrap_err();
        assert_eq!(
            e,
            PlacementError::NotADivisor { node: "node-a".into(), per_gpu: 4, local_size: 6, valid: "6".into() }
        );
        assert!(e
            .to_string()
            .contains("ULYSSES_RANKS_PER_GPU=4 does not divide the 6 ranks on node node-a; use one of 6"));
        let e = gpu_slot("node-a", 0, 8, 2, 2).unwrap_err();
        assert_eq!(
            e,
            PlacementError::StillTooFewGpus {
                node: "node-a".into(),
                per_gpu: 2,
                local_size: 8,
                gpus: 2,
                valid: "4, 8".into()
            }
        );
        assert!(e.to_string().contains("need 4 GPUs but it has 2"), "{e}");
    }

    fn nodes(node_of: &[usize], hosts: &[&str], machines: &[&str]) -> Nodes {
        Nodes {
            node_of: node_of.to_vec(),
            host: hosts.iter().map(|h| h.to_string()).collect(),
            machine: machines.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn a_machine_named_twice_is_refused() {
        // `-hosts localhost,127.0.0.1`: two MPI nodes, one machine.
        let twice = nodes(&[0, 1], &["gpu1", "gpu1"], &["gpu1 boot-1", "gpu1 boot-1"]);
        let e = twice.check_distinct_machines().unwrap_err();
        assert_eq!(e, NodesError::HostTwice { host: "gpu1".into(), count: 2, ranks: "0-1".into() });
        assert!(e.to_string().contains("host gpu1 is named more than once"), "{e}");
        // Two nodes (own host names, one kernel: network namespaces), or two machines.
        let two = nodes(&[0, 0, 2, 2], &["a", "a", "b", "b"], &["a k", "a k", "b k", "b k"]);
        assert_eq!(two.check_distinct_machines(), Ok(()));
        assert_eq!(two.list(), vec![("a".to_string(), vec![0, 1]), ("b".to_string(), vec![2, 3])]);
    }

    #[test]
    fn sp_groups_stay_on_their_node() {
        let two = nodes(&[0, 0, 2, 2], &["a", "a", "b", "b"], &["a", "a", "b", "b"]);
        assert_eq!(two.check_sp_within_nodes(1), Ok(()));
        assert_eq!(two.check_sp_within_nodes(2), Ok(()));
        let e = two.check_sp_within_nodes(4).unwrap_err();
        assert_eq!(
            e,
            NodesError::SpSpansNodes {
                sp: 4,
                first: 0,
                last: 3,
                nodes: 2,
                holders: "a holds 0-1; b holds 2-3".into(),
                valid: "1, 2".into(),
                per_node: 2
            }
        );
        assert!(e
            .to_string()
            .starts_with("parallel.sp = 4 puts world ranks 0..3 in one SP group, but they lie on 2 nodes"));
        // Uneven nodes (3 + 1 ranks): sp = 2 puts ranks 2 and 3 on two nodes.
        let uneven = nodes(&[0, 0, 0, 3], &["a", "a", "a", "b"], &["a", "a", "a", "b"]);
        let e = uneven.check_sp_within_nodes(2).unwrap_err();
        assert!(matches!(e, NodesError::SpSpansNodes { first: 2, last: 3, .. }), "{e:?}");
    }

    #[test]
    fn the_printout_says_which_node_holds_which_rank_on_which_gpu() {
        let two = nodes(&[0, 0, 2, 2], &["a", "a", "b", "b"], &["a", "a", "b", "b"]);
        assert_eq!(two.describe(&[None; 4]), "a holds ranks 0-1\nb holds ranks 2-3\n");
        assert_eq!(
            two.describe(&[Some(0), Some(0), Some(0), Some(1)]),
            "a holds ranks 0-1 (GPU 0: 0-1)\nb holds ranks 2-3 (GPU 0: 2; GPU 1: 3)\n"
        );
        assert_eq!(ranks_text(&[0, 2, 5]), "0, 2, 5");
    }
}
