//! A small reader of the kernel's BTF (/sys/kernel/btf/vmlinux): struct member offsets and
//! enum names, so the observers get this kernel's `sk_buff` layout and drop-reason names at run
//! time instead of numbers baked in for one build. Format: Documentation/bpf/btf.rst (header,
//! type section of `struct btf_type` records with kind-specific trailers, string section).
//! A module's BTF (/sys/kernel/btf/<module>) is split BTF on top of vmlinux's: its type ids
//! continue after vmlinux's last one and its string offsets after vmlinux's string section.
use std::{collections::HashMap, sync::Arc};

use anyhow::{anyhow, bail, Context, Result};
use fwmark_trace_common::{OffsetSource, Offsets, OFFSET_MISSING};

const MAGIC: u16 = 0xeb9f;
/// Bound on type-graph walks, so a malformed (cyclic) type section is an error, not a stack
/// overflow. Real kernels nest anonymous members and modifiers only a few levels deep.
const MAX_DEPTH: u32 = 32;

// BTF_KIND_* (include/uapi/linux/btf.h).
const INT: u8 = 1;
const PTR: u8 = 2;
const ARRAY: u8 = 3;
const STRUCT: u8 = 4;
const UNION: u8 = 5;
const ENUM: u8 = 6;
const TYPEDEF: u8 = 8;
const VOLATILE: u8 = 9;
const CONST: u8 = 10;
const RESTRICT: u8 = 11;
const FUNC: u8 = 12;
const FUNC_PROTO: u8 = 13;
const VAR: u8 = 14;
const DATASEC: u8 = 15;
const FLOAT: u8 = 16;
const DECL_TAG: u8 = 17;
const TYPE_TAG: u8 = 18;
const ENUM64: u8 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u8,
    name: String,
    /// `size` for sized kinds, the referenced type id for modifiers/typedefs/pointers.
    size_or_type: u32,
    members: Vec<Member>,
    enumerators: Vec<(String, i64)>,
    /// Element type and count, for arrays.
    array: Option<(u32, u32)>,
    /// BTF_INT_OFFSET and BTF_INT_BITS of an int (btf.rst, BTF_KIND_INT): without the struct's
    /// kind_flag, a bitfield member is an int whose bits don't fill its size or don't start at 0.
    int_bits: Option<(u32, u32)>,
}

pub(crate) struct KernelBtf {
    /// Index = type id - `first_id` (vmlinux: 0, and type 0 is `void`).
    types: Vec<Type>,
    first_id: u32,
    by_name: HashMap<String, Vec<u32>>,
    strings: Vec<u8>,
    /// The BTF a module's split BTF extends (vmlinux's).
    base: Option<Arc<KernelBtf>>,
}

struct BtfReader<'a> {
    data: &'a [u8],
}

impl BtfReader<'_> {
    fn u32_at(&self, off: usize) -> Result<u32> {
        let b = self
            .data
            .get(off..off + 4)
            .ok_or_else(|| anyhow!("BTF truncated at byte {off}"))?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl KernelBtf {
    /// Reads /sys/kernel/btf/vmlinux (the running kernel's own types).
    pub(crate) fn load() -> Result<Self> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        Self::from_bytes(&data)
    }

    /// Reads a loaded module's BTF (split on `vmlinux`); `None` when no module of that name is
    /// loaded (built in, absent, or not loaded yet).
    pub(crate) fn load_module(vmlinux: &Arc<KernelBtf>, module: &str) -> Option<Result<Self>> {
        let path = format!("/sys/kernel/btf/{module}");
        let data = std::fs::read(&path).ok()?;
        Some(Self::from_split_bytes(&data, Some(vmlinux.clone())).with_context(|| path))
    }

    /// Parses raw BTF. Any malformed input is an error (never a panic): the bytes come from a
    /// file the daemon does not control.
    pub(crate) fn from_bytes(data: &[u8]) -> Result<Self> {
        Self::from_split_bytes(data, None)
    }

    /// Parses raw BTF that extends `base` (a module's), or stands alone (`None`).
    pub(crate) fn from_split_bytes(data: &[u8], base: Option<Arc<KernelBtf>>) -> Result<Self> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            bail!("not raw BTF (bad magic or too short)");
        }
        let r = BtfReader { data };
        let hdr_len = r.u32_at(4)? as usize;
        let (type_off, type_len) = (r.u32_at(8)? as usize, r.u32_at(12)? as usize);
        let (str_off, str_len) = (r.u32_at(16)? as usize, r.u32_at(20)? as usize);
        let section = |off: usize, len: usize| -> Result<&[u8]> {
            hdr_len
                .checked_add(off)
                .and_then(|s| Some(s..s.checked_add(len)?))
                .and_then(|range| data.get(range))
                .ok_or_else(|| anyhow!("BTF section out of bounds"))
        };
        let strings = section(str_off, str_len)?;
        let types_raw = section(type_off, type_len)?;
        let (first_id, base_strings) = match &base {
            Some(b) => (b.first_id + b.types.len() as u32, &b.strings[..]),
            None => (0, &[][..]),
        };
        let name = |off: u32| -> Result<String> {
            let off = off as usize;
            let rest = match off.checked_sub(base_strings.len()) {
                Some(own) => strings.get(own..),
                None => base_strings.get(off..),
            }
            .ok_or_else(|| anyhow!("BTF string offset {off} out of bounds"))?;
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
        };

        let r = BtfReader { data: types_raw };
        let mut types = Vec::new();
        if base.is_none() {
            types.push(Type {
                kind: 0,
                name: String::new(),
                size_or_type: 0,
                members: vec![],
                enumerators: vec![],
                array: None,
                int_bits: None,
            });
        }
        let mut off = 0usize;
        while off < types_raw.len() {
            let info = r.u32_at(off + 4)?;
            let (vlen, kind, kind_flag) = (
                (info & 0xffff) as usize,
                ((info >> 24) & 0x1f) as u8,
                info >> 31 == 1,
            );
            let mut t = Type {
                kind,
                name: name(r.u32_at(off)?)?,
                size_or_type: r.u32_at(off + 8)?,
                members: vec![],
                enumerators: vec![],
                array: None,
                int_bits: None,
            };
            off += 12;
            match kind {
                INT => {
                    let enc = r.u32_at(off)?;
                    t.int_bits = Some(((enc >> 16) & 0xff, enc & 0xff));
                    off += 4;
                }
                VAR | DECL_TAG => off += 4,
                ARRAY => {
                    t.array = Some((r.u32_at(off)?, r.u32_at(off + 8)?));
                    off += 12;
                }
                STRUCT | UNION => {
                    for i in 0..vlen {
                        let at = off + i * 12;
                        let raw = r.u32_at(at + 8)?;
                        t.members.push(Member {
                            name: name(r.u32_at(at)?)?,
                            type_id: r.u32_at(at + 4)?,
                            bit_offset: if kind_flag { raw & 0xff_ffff } else { raw },
                            bitfield_size: if kind_flag { raw >> 24 } else { 0 },
                        });
                    }
                    off += vlen * 12;
                }
                ENUM => {
                    for i in 0..vlen {
                        let at = off + i * 8;
                        let v = r.u32_at(at + 4)?;
                        // kind_flag marks a signed enum.
                        let v = if kind_flag { v as i32 as i64 } else { v as i64 };
                        t.enumerators.push((name(r.u32_at(at)?)?, v));
                    }
                    off += vlen * 8;
                }
                ENUM64 => {
                    for i in 0..vlen {
                        let at = off + i * 12;
                        let v = (r.u32_at(at + 4)? as u64) | (r.u32_at(at + 8)? as u64) << 32;
                        t.enumerators.push((name(r.u32_at(at)?)?, v as i64));
                    }
                    off += vlen * 12;
                }
                FUNC_PROTO => off += vlen * 8,
                DATASEC => off += vlen * 12,
                0 | 20.. => bail!("unknown BTF kind {kind} at type {}", types.len()),
                _ => {}
            }
            types.push(t);
        }
        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        for (i, t) in types.iter().enumerate() {
            if !t.name.is_empty() {
                let id = first_id.saturating_add(i as u32);
                by_name.entry(t.name.clone()).or_default().push(id);
            }
        }
        Ok(Self {
            types,
            first_id,
            by_name,
            strings: strings.to_vec(),
            base,
        })
    }

    fn get(&self, id: u32) -> Result<&Type> {
        match (id.checked_sub(self.first_id), &self.base) {
            (Some(i), _) => self.types.get(i as usize),
            (None, Some(base)) => return base.get(id),
            (None, None) => None,
        }
        .ok_or_else(|| anyhow!("BTF type id {id} out of range"))
    }

    /// The ids of the types named `name`, this BTF's first, then its base's.
    fn named(&self, name: &str) -> impl Iterator<Item = u32> + '_ {
        let base = self.base.as_deref().map(|b| b.named(name));
        let base: Box<dyn Iterator<Item = u32>> = match base {
            Some(b) => Box::new(b),
            None => Box::new(std::iter::empty()),
        };
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .copied()
            .chain(base)
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Result<u32> {
        for _ in 0..32 {
            match self.get(id)?.kind {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = self.get(id)?.size_or_type,
                _ => return Ok(id),
            }
        }
        bail!("BTF type {id}: modifier chain too long")
    }

    fn size_of(&self, id: u32, depth: u32) -> Result<u32> {
        let t = self.get(self.resolve(id)?)?;
        Ok(match t.kind {
            INT | STRUCT | UNION | ENUM | ENUM64 | FLOAT => t.size_or_type,
            // BTF records no pointer size; 8 matches the 64-bit loads the observers make of pointers.
            PTR => 8,
            ARRAY if depth < MAX_DEPTH => {
                let (elem, n) = t.array.unwrap_or_default();
                self.size_of(elem, depth + 1)?
                    .checked_mul(n)
                    .ok_or_else(|| anyhow!("BTF array type {id} size overflows"))?
            }
            k => bail!("BTF type {id} of kind {k} has no size"),
        })
    }

    /// Whether a member is a bitfield, in either BTF encoding: the struct's kind_flag gives a
    /// bitfield size, or (no kind_flag) the member's int type covers only part of its bytes.
    fn is_bitfield(&self, m: &Member, bit_offset: u32) -> Result<bool> {
        if m.bitfield_size != 0 || !bit_offset.is_multiple_of(8) {
            return Ok(true);
        }
        let t = self.get(self.resolve(m.type_id)?)?;
        Ok(match t.int_bits {
            Some((int_off, bits)) => int_off != 0 || bits != t.size_or_type.saturating_mul(8),
            None => false,
        })
    }

    /// The struct or union (not a forward declaration) with this name, or a typedef of one
    /// (`possible_net_t` is a typedef of an anonymous struct).
    fn find_struct(&self, name: &str) -> Result<u32> {
        self.named(name)
            .filter_map(|id| self.resolve(id).ok())
            .find(|&id| {
                self.get(id).is_ok_and(|t| {
                    matches!(t.kind, STRUCT | UNION)
                        && !(t.members.is_empty() && t.size_or_type == 0)
                })
            })
            .ok_or_else(|| anyhow!("kernel BTF has no struct {name}"))
    }

    /// (bit offset, member) of `name` in composite `id`, searching anonymous members too.
    fn find_member(&self, id: u32, name: &str, depth: u32) -> Result<Option<(u32, Member)>> {
        if depth > MAX_DEPTH {
            bail!("BTF type {id}: anonymous members nested too deep");
        }
        let t = self.get(self.resolve(id)?)?;
        for m in &t.members {
            if m.name == name {
                return Ok(Some((m.bit_offset, m.clone())));
            }
            if m.name.is_empty() {
                if let Some((inner, found)) = self.find_member(m.type_id, name, depth + 1)? {
                    let bits = m.bit_offset.checked_add(inner);
                    let bits = bits.ok_or_else(|| anyhow!("BTF type {id}: offset overflows"))?;
                    return Ok(Some((bits, found)));
                }
            }
        }
        Ok(None)
    }

    fn walk(&self, struct_name: &str, path: &str) -> Result<(u32, Member)> {
        let mut id = self.find_struct(struct_name)?;
        let mut bits = 0u32;
        let mut last = None;
        for part in path.split('.') {
            let (off, m) = self.find_member(id, part, 0)?.ok_or_else(|| {
                anyhow!("kernel BTF: struct {struct_name} has no member {path} (no `{part}`)")
            })?;
            // Overflow only on malformed BTF; the path's offset is absolute from the struct.
            let at = bits
                .checked_add(off)
                .ok_or_else(|| anyhow!("kernel BTF: {struct_name}.{path}: offset overflows"))?;
            if self.is_bitfield(&m, at)? {
                bail!("kernel BTF: {struct_name}.{path} is a bitfield (no plain load reads it)");
            }
            bits = at;
            id = m.type_id;
            last = Some(m);
        }
        Ok((bits / 8, last.ok_or_else(|| anyhow!("empty member path"))?))
    }

    /// Byte offset of a (possibly nested, dotted) member, looking through anonymous
    /// structs/unions: `member_offset("sk_buff", "mark")`, `member_offset("net", "ns.inum")`.
    pub(crate) fn member_offset(&self, struct_name: &str, path: &str) -> Result<u32> {
        Ok(self.walk(struct_name, path)?.0)
    }

    /// Byte size of a member's type, through typedefs and qualifiers (4 for `sk_buff.mark`).
    pub(crate) fn member_size(&self, struct_name: &str, path: &str) -> Result<u32> {
        self.size_of(self.walk(struct_name, path)?.1.type_id, 0)
    }

    /// (name, value) of every enumerator of a named enum (BTF_KIND_ENUM or ENUM64).
    pub(crate) fn enum_values(&self, enum_name: &str) -> Result<Vec<(String, i64)>> {
        self.named(enum_name)
            .filter_map(|id| self.get(id).ok())
            .find(|t| matches!(t.kind, ENUM | ENUM64) && !t.enumerators.is_empty())
            .map(|t| t.enumerators.clone())
            .ok_or_else(|| anyhow!("kernel BTF has no enum {enum_name}"))
    }

    /// The BTF id of a kernel function (what fentry/fexit programs attach to).
    pub(crate) fn func_id(&self, name: &str) -> Option<u32> {
        self.named(name)
            .find(|&id| self.get(id).is_ok_and(|t| t.kind == FUNC))
    }

    /// Whether any type of that name exists (e.g. `btf_trace_fib_table_lookup`: the tracepoint
    /// exists; `bpf_nf_ctx`: netfilter programs exist).
    #[cfg(test)]
    pub(crate) fn has_type(&self, name: &str) -> bool {
        self.named(name).next().is_some()
    }
}

/// The kernel struct offsets the observers need (their `Config::offsets`), from vmlinux's BTF,
/// as `Offsets::FIELDS` says: a required member missing is an error, an optional one (the
/// conntrack mark with CONFIG_NF_CONNTRACK_MARK, `sk_mark`, the routing lookups' members)
/// becomes `OFFSET_MISSING` (the observers then skip it). The chain evaluators' members are
/// left missing here: the fentry back-end fills them (`nft_offsets`, `xt_offsets`).
pub(crate) fn offsets(btf: &KernelBtf) -> Result<Offsets> {
    let mut offsets = Offsets::MISSING;
    for field in Offsets::FIELDS {
        let found = match field.source {
            OffsetSource::Required(s, p) => btf.member_offset(s, p)?,
            OffsetSource::Optional(s, p) => btf.member_offset(s, p).unwrap_or(OFFSET_MISSING),
            OffsetSource::Module(..) | OffsetSource::Computed => continue,
        };
        (field.set)(&mut offsets, found);
    }
    check_widths(btf)?;
    // `nf_observe` reads `hook` and `pf` together.
    if offsets.nf_state_pf != offsets.nf_state_hook + 1 {
        bail!("this kernel's nf_hook_state has `pf` apart from `hook`: unsupported layout");
    }
    // The IPv6 lookup observer reads flowi6's common fields at flowi4's offsets: without that,
    // no IPv6 lookups.
    let same_common = ["flowic_mark", "flowic_oif", "flowic_iif", "flowic_proto"]
        .iter()
        .all(|f| {
            let path = format!("__fl_common.{f}");
            btf.member_offset("flowi4", &path).ok() == btf.member_offset("flowi6", &path).ok()
        });
    if !same_common {
        offsets.fib6_tb_id = OFFSET_MISSING;
    }
    // Which extension the sec_path is depends on the kernel's options.
    offsets.skb_ext_sec_path = btf
        .enum_values("skb_ext_id")
        .ok()
        .and_then(|v| v.into_iter().find(|(n, _)| n == "SKB_EXT_SEC_PATH"))
        .and_then(|(_, v)| u32::try_from(v).ok())
        .unwrap_or(OFFSET_MISSING);
    Ok(offsets)
}

/// Members the observers load with a fixed width (a plain load, not a BTF-sized read): a kernel
/// whose member is another size would have them read garbage, so it is refused at start-up.
const WIDTHS: [(&str, &str, u32); 8] = [
    ("sk_buff", "mark", 4),
    ("sk_buff", "_nfct", 8),
    ("sk_buff", "protocol", 2),
    ("sk_buff", "network_header", 2),
    ("nf_hook_state", "hook", 1),
    ("nf_hook_state", "pf", 1),
    ("net_device", "nd_net.net", 8),
    ("net", "ns.inum", 4),
];

fn check_widths(btf: &KernelBtf) -> Result<()> {
    for (s, p, want) in WIDTHS {
        let size = btf.member_size(s, p)?;
        if size != want {
            bail!("this kernel's {s}.{p} is {size} bytes; the observers read {want}: unsupported layout");
        }
    }
    Ok(())
}

/// The members of the types `module` defines (`OffsetSource::Module`), from `btf`: that
/// module's BTF, or one that includes its types (a module using them, vmlinux when built in).
fn module_offsets(btf: &KernelBtf, module: &str, into: &mut Offsets) -> Result<()> {
    for field in Offsets::FIELDS {
        if let OffsetSource::Module(m, s, p) = field.source {
            if m == module {
                (field.set)(into, btf.member_offset(s, p)?);
            }
        }
    }
    Ok(())
}

/// What `nft_do_chain`'s observers read (`nft_pkt_skb`, `nft_pkt_state`, `nft_chain_prio_back`),
/// from the BTF that has nf_tables' types (its module's, or vmlinux's when built in).
pub(crate) fn nft_offsets(btf: &KernelBtf, into: &mut Offsets) -> Result<()> {
    module_offsets(btf, "nf_tables", into)?;
    let prio = btf.member_offset("nft_base_chain", "ops.priority")?;
    let chain = btf.member_offset("nft_base_chain", "chain")?;
    into.nft_chain_prio_back = chain
        .checked_sub(prio)
        .context("nft_base_chain: the hook ops follow the chain")?;
    Ok(())
}

/// What `ipt_do_table`'s and `ip6t_do_table`'s observers read (`xt_table_priority`), from
/// ip_tables' or ip6_tables' BTF (x_tables defines `struct xt_table`; both include it).
pub(crate) fn xt_offsets(btf: &KernelBtf, into: &mut Offsets) -> Result<()> {
    module_offsets(btf, "x_tables", into)
}

/// `enum skb_drop_reason` values → names without the `SKB_DROP_REASON_` prefix.
pub(crate) fn drop_reason_names(btf: &KernelBtf) -> Result<HashMap<u32, String>> {
    Ok(btf
        .enum_values("skb_drop_reason")?
        .into_iter()
        .map(|(name, v)| {
            let short = name.strip_prefix("SKB_DROP_REASON_").unwrap_or(&name);
            (v as u32, short.to_owned())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds raw BTF from (kind, name, size_or_type, kind_flag, trailer words).
    #[derive(Default)]
    struct Builder {
        types: Vec<u32>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: vec![],
                strings: vec![0],
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn ty(
            &mut self,
            kind: u8,
            name: &str,
            vlen: usize,
            flag: bool,
            size: u32,
            trailer: &[u32],
        ) {
            let n = self.s(name);
            let info = (vlen as u32) | (kind as u32) << 24 | (flag as u32) << 31;
            self.types.extend([n, info, size]);
            self.types.extend_from_slice(trailer);
        }
        fn composite(&mut self, kind: u8, name: &str, size: u32, members: &[(&str, u32, u32)]) {
            let mut trailer = vec![];
            for (n, t, off) in members {
                let n = self.s(n);
                trailer.extend([n, *t, *off]);
            }
            self.ty(kind, name, members.len(), false, size, &trailer);
        }
        fn bytes(&self) -> Vec<u8> {
            let types: Vec<u8> = self.types.iter().flat_map(|w| w.to_le_bytes()).collect();
            let mut out = vec![];
            out.extend(MAGIC.to_le_bytes());
            out.extend([1u8, 0]);
            for w in [
                24u32,
                0,
                types.len() as u32,
                types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend(w.to_le_bytes());
            }
            out.extend(types);
            out.extend(&self.strings);
            out
        }
    }

    /// [1] int u32, [2] typedef __u32 → 1, [3] anon union { mark: 2 },
    /// [4] struct inner { pad, inum: 1 @32 }, [5] struct sk_buff (kind_flag) { anon(3) @64,
    /// ns: 4 @128, bf: 3-bit bitfield @256 }, [6] enum skb_drop_reason { A=0, NETFILTER_DROP=6 },
    /// [7] enum64 big { X = 1<<40 }, [8] const → 5, [9] typedef skb_t → 8,
    /// [10] struct wrap { s: 9 @64 }, [11] int with BTF_INT_OFFSET 2, BITS 3,
    /// [12] struct legacy (no kind_flag) { x: 11 @0, y: 1 @32 }, [13] signed enum sgn { NEG=-1 }.
    fn sample_bytes() -> Vec<u8> {
        let mut b = Builder::new();
        b.ty(INT, "unsigned int", 0, false, 4, &[32]);
        b.ty(TYPEDEF, "__u32", 0, false, 1, &[]);
        b.composite(UNION, "", 4, &[("mark", 2, 0)]);
        b.composite(STRUCT, "inner", 8, &[("pad", 1, 0), ("inum", 1, 32)]);
        let mut trailer = vec![];
        for (n, t, off) in [
            ("", 3u32, 64u32),
            ("ns", 4, 128),
            ("bf", 1, (3 << 24) | 256),
        ] {
            let n = b.s(n);
            trailer.extend([n, t, off]);
        }
        b.ty(STRUCT, "sk_buff", 3, true, 48, &trailer);
        let (a, bb) = (
            b.s("SKB_DROP_REASON_A"),
            b.s("SKB_DROP_REASON_NETFILTER_DROP"),
        );
        b.ty(ENUM, "skb_drop_reason", 2, false, 4, &[a, 0, bb, 6]);
        let x = b.s("X");
        b.ty(ENUM64, "big", 1, false, 8, &[x, 0, 1 << 8]);
        b.ty(CONST, "", 0, false, 5, &[]);
        b.ty(TYPEDEF, "skb_t", 0, false, 8, &[]);
        b.composite(STRUCT, "wrap", 56, &[("s", 9, 64)]);
        b.ty(INT, "", 0, false, 4, &[(2 << 16) | 3]);
        b.composite(STRUCT, "legacy", 8, &[("x", 11, 0), ("y", 1, 32)]);
        let neg = b.s("NEG");
        b.ty(ENUM, "sgn", 1, true, 4, &[neg, u32::MAX]);
        b.bytes()
    }

    fn sample() -> KernelBtf {
        KernelBtf::from_bytes(&sample_bytes()).unwrap()
    }

    #[test]
    fn offsets_through_anonymous_unions_and_paths() {
        let btf = sample();
        assert_eq!(btf.member_offset("sk_buff", "mark").unwrap(), 8);
        assert_eq!(btf.member_size("sk_buff", "mark").unwrap(), 4);
        assert_eq!(btf.member_offset("sk_buff", "ns.inum").unwrap(), 20);
        assert_eq!(btf.member_size("sk_buff", "ns").unwrap(), 8);
    }

    #[test]
    fn typedefs_and_qualifiers_are_followed() {
        let btf = sample();
        // Path through a member typed `typedef const struct sk_buff`.
        assert_eq!(btf.member_offset("wrap", "s.ns.inum").unwrap(), 28);
        assert_eq!(btf.member_offset("wrap", "s.mark").unwrap(), 16);
        assert_eq!(btf.member_size("wrap", "s").unwrap(), 48);
        // A typedef name stands for its struct.
        assert_eq!(btf.member_offset("skb_t", "mark").unwrap(), 8);
    }

    #[test]
    fn errors_name_what_is_missing() {
        let btf = sample();
        let e = btf
            .member_offset("sk_buff", "nope")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sk_buff") && e.contains("nope"), "{e}");
        let e = btf
            .member_offset("sk_buff", "ns.x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sk_buff") && e.contains("ns.x"), "{e}");
        let e = btf
            .member_offset("nf_conn", "mark")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nf_conn"), "{e}");
        // Walking into a scalar finds nothing either.
        assert!(btf.member_offset("sk_buff", "mark.x").is_err());
        assert!(btf.enum_values("sk_buff").is_err());
    }

    #[test]
    fn bitfields_are_rejected_in_both_encodings() {
        let btf = sample();
        let e = btf.member_offset("sk_buff", "bf").unwrap_err().to_string();
        assert!(e.contains("bitfield") && e.contains("sk_buff.bf"), "{e}");
        // No kind_flag: the int type's encoding marks the bitfield.
        let e = btf.member_offset("legacy", "x").unwrap_err().to_string();
        assert!(e.contains("bitfield"), "{e}");
        assert_eq!(btf.member_offset("legacy", "y").unwrap(), 4);
    }

    #[test]
    fn enums_and_names() {
        let btf = sample();
        let names = drop_reason_names(&btf).unwrap();
        assert_eq!(names[&6], "NETFILTER_DROP");
        assert_eq!(names[&0], "A");
        assert_eq!(
            btf.enum_values("big").unwrap(),
            vec![("X".into(), 1i64 << 40)]
        );
        assert_eq!(btf.enum_values("sgn").unwrap(), vec![("NEG".into(), -1)]);
        assert!(btf.has_type("__u32") && btf.has_type("big") && !btf.has_type("nope"));
    }

    #[test]
    fn cyclic_types_are_an_error_not_a_stack_overflow() {
        // [1] struct loop { anon: 1 } (an anonymous member of its own type).
        let mut b = Builder::new();
        b.composite(STRUCT, "loop", 4, &[("", 1, 0)]);
        let btf = KernelBtf::from_bytes(&b.bytes()).unwrap();
        assert!(btf.member_offset("loop", "x").is_err());
        // [1] array of itself, [2] struct s { a: 1 }; [3] typedef t → 4, [4] typedef → 3.
        let mut b = Builder::new();
        b.ty(ARRAY, "", 0, false, 0, &[1, 1, 2]);
        b.composite(STRUCT, "s", 4, &[("a", 1, 0)]);
        b.ty(TYPEDEF, "t", 0, false, 4, &[]);
        b.ty(TYPEDEF, "u", 0, false, 3, &[]);
        let btf = KernelBtf::from_bytes(&b.bytes()).unwrap();
        assert!(btf.member_size("s", "a").is_err());
        assert!(btf.member_offset("t", "a").is_err());
    }

    #[test]
    fn split_btf_continues_ids_and_strings_of_its_base() {
        let base = Arc::new(sample());
        let base_strings = base.strings.len() as u32;
        // The module's own string section starts where the base's ends; its first type is
        // id 14; "mark" is a name of the base's, "pkt" and "do_chain" the module's.
        let mut b = Builder::new();
        b.strings.clear();
        let mut own = |n: &str| b.s(n) + base_strings;
        let (pkt, skb, do_chain) = (own("pkt"), own("skb"), own("do_chain"));
        let mark = base
            .strings
            .windows(5)
            .position(|w| w == b"mark\0")
            .unwrap() as u32;
        // [14] struct pkt { skb: sk_buff (5) @0, mark: u32 (1) @64 }, [15] func do_chain.
        b.types
            .extend([pkt, 2 | (STRUCT as u32) << 24, 16, skb, 5, 0, mark, 1, 64]);
        b.types.extend([do_chain, (FUNC as u32) << 24, 0]);
        let module = KernelBtf::from_split_bytes(&b.bytes(), Some(base.clone())).unwrap();
        assert_eq!(module.member_offset("pkt", "mark").unwrap(), 8);
        assert_eq!(module.member_size("pkt", "mark").unwrap(), 4);
        // Through a base type (sk_buff, id 5) and to the base's names.
        assert_eq!(module.member_offset("pkt", "skb.ns.inum").unwrap(), 20);
        assert_eq!(module.func_id("do_chain"), Some(15));
        assert!(module.has_type("sk_buff") && module.func_id("sk_buff").is_none());
        // A string offset past both sections is an error.
        let mut bad = b.bytes();
        let n = bad.len();
        bad[n - 1] = 1;
        let _ = KernelBtf::from_split_bytes(&bad, Some(base));
    }

    #[test]
    fn truncated_or_bad_magic_input_is_an_error() {
        let good = sample_bytes();
        for len in 0..good.len() {
            // Every cut lands inside the type or string section (or the header).
            assert!(KernelBtf::from_bytes(&good[..len]).is_err(), "len {len}");
        }
        let mut bad = good.clone();
        bad[0] = 0;
        let e = KernelBtf::from_bytes(&bad).err().unwrap().to_string();
        assert!(e.contains("magic"), "{e}");
    }

    /// Every query a caller makes, on whatever parsed.
    fn query_all(btf: &KernelBtf) {
        for (s, p) in [("sk_buff", "mark"), ("wrap", "s.ns.inum"), ("legacy", "x")] {
            let _ = btf.member_offset(s, p);
            let _ = btf.member_size(s, p);
        }
        let _ = drop_reason_names(btf);
        let _ = btf.enum_values("big");
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn corrupted_input_never_panics(
            edits in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..8),
        ) {
            let mut data = sample_bytes();
            for (at, byte) in edits {
                let n = data.len();
                data[at % n] = byte;
            }
            if let Ok(btf) = KernelBtf::from_bytes(&data) {
                query_all(&btf);
            }
        }

        #[test]
        fn random_bytes_never_panic(mut data in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            // Keep the magic half the time so the parser gets past the first check.
            if data.len() >= 2 && data[0] & 1 == 0 {
                data[..2].copy_from_slice(&MAGIC.to_le_bytes());
            }
            if let Ok(btf) = KernelBtf::from_bytes(&data) {
                query_all(&btf);
            }
        }
    }

    /// `sk_buff.mark` on the kernel this module was developed against (cross-checked with
    /// `bpftool btf dump … format raw`); on any other kernel the test only prints what it found.
    const CHECKED_KERNEL: (&str, u32) = ("6.18.44-fc-v657", 164);

    #[test]
    fn live_kernel_offsets() {
        let btf = KernelBtf::load()
            .expect("/sys/kernel/btf/vmlinux is required (kernel with CONFIG_DEBUG_INFO_BTF)");
        let o = offsets(&btf).unwrap();
        println!("{o:#?}");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if release.trim() == CHECKED_KERNEL.0 {
            assert_eq!(o.skb_mark, CHECKED_KERNEL.1);
        }
        assert!(o.skb_mark > 0 && o.skb_mark < 256);
        // The widths the observers' plain loads assume hold here.
        check_widths(&btf).unwrap();
        // `possible_net_t` is a typedef of an anonymous struct whose only member is `net`.
        assert_eq!(btf.member_offset("possible_net_t", "net").unwrap(), 0);
        let reasons = drop_reason_names(&btf).unwrap();
        for r in ["NETFILTER_DROP", "IP_RPFILTER", "XFRM_POLICY", "NO_SOCKET"] {
            assert!(reasons.values().any(|n| n == r), "{r} missing");
        }
        // The two values outside the SKB_DROP_REASON_ prefix keep their names.
        for r in ["SKB_CONSUMED", "NOT_SPECIFIED"] {
            assert!(reasons.values().any(|n| n == r), "{r} missing");
        }
        let nf = reasons.iter().find(|(_, n)| *n == "NETFILTER_DROP");
        println!(
            "{} drop reasons; NETFILTER_DROP = {:?}",
            reasons.len(),
            nf.map(|(v, _)| v)
        );
        assert!(btf.has_type("bpf_nf_ctx"));
        assert!(
            btf.member_offset("sk_buff", "cloned").is_err(),
            "a bitfield"
        );
    }
}
