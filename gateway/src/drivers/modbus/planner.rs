//! The read planner: merges a device's tags into as few Modbus requests as possible.
//!
//! Tags of the same area whose ranges touch, overlap or lie within `max_gap` registers of each other
//! share one request, up to the protocol limit (125 registers or 2000 bits, or less if configured).
//! Fewer requests matter most on slow serial buses, where each round trip costs tens of ms.

use super::codec::Area;

/// One read request and the tags it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub area: Area,
    pub start: u16,
    pub count: u16,
    /// Indexes into the device's tag list.
    pub tags: Vec<usize>,
}

/// What the planner needs of one tag: where it lives and how many registers (or bits) it spans.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub area: Area,
    pub address: u16,
    pub len: u16,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Unused registers that may be read to bridge two tags (for bit areas, ×16 bits).
    pub max_gap: u16,
    pub max_registers: u16,
    pub max_bits: u16,
}

pub fn plan(spans: &[Span], limits: Limits) -> Vec<ReadRequest> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| (spans[i].area, spans[i].address, spans[i].len));
    let mut out: Vec<ReadRequest> = Vec::new();
    // The end (exclusive) of the last request, kept as u32 because a range may end at 65536.
    let mut end: u32 = 0;
    for i in order {
        let s = spans[i];
        let (gap, max) = if s.area.is_bit() {
            (u32::from(limits.max_gap) * 16, u32::from(limits.max_bits))
        } else {
            (u32::from(limits.max_gap), u32::from(limits.max_registers))
        };
        let (a, b) = (u32::from(s.address), u32::from(s.address) + u32::from(s.len));
        if let Some(last) = out.last_mut() {
            let start = u32::from(last.start);
            if last.area == s.area && a <= end + gap && b.max(end) - start <= max {
                end = end.max(b);
                last.count = (end - start) as u16;
                last.tags.push(i);
                continue;
            }
        }
        out.push(ReadRequest { area: s.area, start: s.address, count: s.len, tags: vec![i] });
        end = b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits { max_gap: 8, max_registers: 125, max_bits: 2000 };

    fn reg(area: Area, address: u16, len: u16) -> Span {
        Span { area, address, len }
    }

    #[test]
    fn contiguous_and_near_tags_merge() {
        let spans = [reg(Area::Holding, 0, 2), reg(Area::Holding, 2, 1), reg(Area::Holding, 10, 4)];
        let p = plan(&spans, L);
        assert_eq!(p, vec![ReadRequest { area: Area::Holding, start: 0, count: 14, tags: vec![0, 1, 2] }]);
    }

    #[test]
    fn far_tags_and_other_areas_split() {
        let spans =
            [reg(Area::Holding, 0, 1), reg(Area::Holding, 100, 1), reg(Area::Input, 0, 1), reg(Area::Coil, 0, 1)];
        let p = plan(&spans, L);
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].area, Area::Coil);
        assert!(p.iter().all(|r| r.count == 1));
    }

    #[test]
    fn requests_respect_the_size_limit() {
        let spans: Vec<Span> = (0..300).map(|i| reg(Area::Holding, i, 1)).collect();
        let p = plan(&spans, L);
        assert_eq!(p.iter().map(|r| r.count).collect::<Vec<_>>(), vec![125, 125, 50]);
        let bits: Vec<Span> = (0..4500).map(|i| reg(Area::Coil, i, 1)).collect();
        assert_eq!(plan(&bits, L).iter().map(|r| r.count).collect::<Vec<_>>(), vec![2000, 2000, 500]);
    }

    #[test]
    fn a_value_never_straddles_two_requests() {
        // 124 registers used, then a 4-register value: it must start a new request.
        let spans = [reg(Area::Holding, 0, 124), reg(Area::Holding, 124, 4)];
        let p = plan(&spans, L);
        assert_eq!(p.len(), 2);
        assert_eq!((p[1].start, p[1].count), (124, 4));
    }

    #[test]
    fn overlapping_tags_share_registers() {
        let spans = [reg(Area::Holding, 0, 4), reg(Area::Holding, 0, 2), reg(Area::Holding, 2, 2)];
        let p = plan(&spans, L);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].count, 4);
    }

    #[test]
    fn zero_gap_merges_only_adjacent() {
        let spans = [reg(Area::Holding, 0, 1), reg(Area::Holding, 1, 1), reg(Area::Holding, 3, 1)];
        let p = plan(&spans, Limits { max_gap: 0, ..L });
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn top_of_address_space() {
        let spans = [reg(Area::Holding, 65532, 4), reg(Area::Holding, 65535, 1)];
        let p = plan(&spans, L);
        assert_eq!((p[0].start, p[0].count), (65532, 4));
    }
}
