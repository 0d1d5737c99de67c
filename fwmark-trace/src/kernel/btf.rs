// TEMPORARY STUB (replaced by the real BTF reader)
use anyhow::Result;
pub struct KernelBtf;
impl KernelBtf {
    pub fn load() -> Result<Self> {
        Ok(KernelBtf)
    }
}
#[derive(Debug, Clone, Copy, Default)]
pub struct Offsets {
    pub skb_mark: u32,
    pub skb_nfct: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    pub skb_head: u32,
    pub skb_data: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_protocol: u32,
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    pub net_ns_inum: u32,
    pub nf_conn_mark: u32,
    pub sock_sk_mark: u32,
    pub nf_state_hook: u32,
    pub nf_state_pf: u32,
    pub nf_state_in: u32,
    pub nf_state_out: u32,
    pub nf_state_net: u32,
}
impl Offsets {
    pub fn from_btf(_b: &KernelBtf) -> Result<Self> {
        Ok(Offsets {
            skb_mark: 164,
            skb_nfct: 104,
            skb_dev: 16,
            skb_sk: 24,
            skb_head: 192,
            skb_data: 200,
            skb_network_header: 180,
            skb_transport_header: 0,
            skb_protocol: 176,
            dev_ifindex: 224,
            dev_nd_net: 264,
            net_ns_inum: 176,
            nf_conn_mark: 168,
            sock_sk_mark: 524,
            nf_state_hook: 0,
            nf_state_pf: 1,
            nf_state_in: 8,
            nf_state_out: 16,
            nf_state_net: 32,
        })
    }
}
pub fn drop_reason_names(_b: &KernelBtf) -> Result<std::collections::HashMap<u32, String>> {
    Ok(std::collections::HashMap::from([(
        6u32,
        "NETFILTER_DROP".to_string(),
    )]))
}
