//! The object's global configuration and its maps: what the observers share with each other
//! and with the daemon, which finds each by its name.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use fwmark_trace_common::{
    lost_reason, AggKey, AggValue, Config, Control, CpuCache, PacketState, AGG_ENTRIES,
};

// SAFETY: no other symbol in the object is named CONFIG; the daemon finds the global by this
// name (`GLOBAL_CONFIG`) and patches its `.rodata` bytes before the load.
#[unsafe(no_mangle)]
pub static CONFIG: Config = Config::ZERO;

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Every live packet, by `sk_buff` address, naming the CPU whose cache holds it. A common LRU:
/// with per-CPU lists (BPF_F_NO_COMMON_LRU) the delete at every end of life measured twice as
/// slow here.
#[map]
pub static PACKETS: LruHashMap<u64, PacketState> = LruHashMap::with_max_entries(65536, 0);

/// Per CPU, the packets it is processing: what an observer of an unchanged mark reads instead
/// of the shared map.
#[map]
pub static CACHE: PerCpuArray<CpuCache> = PerCpuArray::with_max_entries(1, 0);

/// Transitions and drops counted per CPU (`Config::aggregate`), read by the daemon every
/// interval: one record per distinct transition instead of one per packet.
#[map]
pub static AGG: LruPerCpuHashMap<AggKey, AggValue> =
    LruPerCpuHashMap::with_max_entries(AGG_ENTRIES, 0);

/// Per CPU: where a new `AGG` value is put together (too large for the stack beside an event).
#[map]
pub static AGG_SCRATCH: PerCpuArray<AggValue> = PerCpuArray::with_max_entries(1, 0);

/// Settings the daemon changes while running (`Control`).
#[map]
pub static CONTROL: Array<Control> = Array::with_max_entries(1, 0);

/// Events lost, per reason (`lost_reason::*`).
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(lost_reason::COUNT, 0);

/// Packets counted in `AGG` (see `MAP_COUNTED`).
#[map]
pub static COUNTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU packet id counter.
#[map]
pub static SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Interfaces to report when `Config::iface_filter` is set (ifindex → 1).
#[map]
pub static IFACES: HashMap<u32, u8> = HashMap::with_max_entries(256, 0);

/// Conntrack entries of followed flows (`Config::flow`): after NAT rewrote a packet's tuple,
/// its connection still says it belongs to the flow.
#[map]
pub static FOLLOWED: LruHashMap<u64, u8> = LruHashMap::with_max_entries(4096, 0);

/// Per CPU: whether the packet an observer saw last belongs to a followed flow. A routing
/// lookup without ports (re-routing after a mark change, input routes, reverse-path checks)
/// runs for the packet being processed on this CPU: this is how it is joined to it.
#[map]
pub static FOLLOWING: PerCpuArray<u8> = PerCpuArray::with_max_entries(1, 0);
