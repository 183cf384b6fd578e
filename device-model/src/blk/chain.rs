//! Gathering a descriptor chain, and finding out why one could not be walked.

use std::mem::size_of;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::exec::Fault;
use super::request::ParseError;

/// Size of one split-ring descriptor.
const DESC_LEN: u64 = size_of::<RawDescriptor>() as u64;

/// Walk `chain` into `out`, keeping at most `max` descriptors.
///
/// virtio-queue ends a walk silently on a loop, a bad index, an unreadable descriptor or a bad
/// indirect table; such a chain ends in a descriptor that still has `NEXT` set, or yields nothing.
/// A chain with more than `max` descriptors (possible through an indirect table) is walked to its
/// end so that its real last descriptor (the status byte) replaces the last one kept.
pub(crate) fn collect<M>(
    chain: DescriptorChain<&M>,
    max: usize,
    out: &mut Vec<Descriptor>,
) -> Result<(), ParseError>
where
    M: GuestMemory,
{
    out.clear();
    let mut count = 0usize;
    let mut last = None;
    for desc in chain {
        count = count.saturating_add(1);
        if out.len() < max {
            out.push(desc);
        }
        last = Some(desc);
    }
    match last {
        None => Err(ParseError::EmptyChain),
        Some(desc) if desc.has_next() => Err(ParseError::Truncated),
        Some(desc) if count > max => {
            if let Some(slot) = out.last_mut() {
                *slot = desc;
            }
            Err(ParseError::TooLong { len: count, max })
        }
        Some(_) => Ok(()),
    }
}

/// Walk the chain virtio-queue popped into `out`, as [`collect`] does; a chain virtio-queue
/// could not walk (it yields nothing, or ends in a descriptor with `NEXT`) is walked again by
/// hand ([`rewalk`]), and if that walk finds the whole chain it is taken as walked.
///
/// The two walks may see different translations: a descriptor or an indirect table that missed
/// in virtio-queue's walk may translate now (an UPDATE answering another request's miss of the
/// same page came in between). Such a chain is whole and must run, not fail with IOERR. On an
/// error, `out` holds what [`exec::answer_unwalkable`](super::exec::answer_unwalkable) needs.
pub(crate) fn gather<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    max: usize,
    out: &mut Vec<Descriptor>,
) -> Result<(), ParseError> {
    let head = chain.head_index();
    let err = match collect(chain, max, out) {
        Err(err @ (ParseError::EmptyChain | ParseError::Truncated)) => err,
        r => return r,
    };
    match rewalk(mem, desc_table, queue_size, head, out) {
        Rewalk::End(_) if whole(out, max) => Ok(()),
        _ => Err(err),
    }
}

/// Whether walked descriptors are a chain virtio-queue would have yielded whole and
/// [`collect`] kept: at most `max` of them, and no more than 2^32 - 1 bytes in all (virtio 1.2
/// section 2.7.5.2).
fn whole(descs: &[Descriptor], max: usize) -> bool {
    descs.len() <= max
        && descs
            .iter()
            .try_fold(0u32, |total, d| total.checked_add(d.len()))
            .is_some()
}

/// Check that `len` bytes at `addr` translate for reading, item by item.
fn check_readable<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Result<(), GuestMemoryError> {
    for slice in mem.get_slices(addr, len, Permissions::Read)? {
        slice?;
    }
    Ok(())
}

/// What a second, careful walk of a chain that virtio-queue could not walk found.
#[derive(Debug)]
pub(crate) enum Rewalk {
    /// An IOMMU fault on a descriptor or an indirect table.
    Fault(Fault),
    /// The chain does end, in this descriptor (every descriptor seen is in the walk's output).
    /// Either virtio-queue gave up for a reason that leaves the request answerable (its lengths
    /// add up past 2^32, which virtio 1.2 section 2.7.5.2 forbids), so the status byte can still
    /// carry `VIRTIO_BLK_S_IOERR`; or a translation virtio-queue missed is there now.
    End(Descriptor),
    /// A loop, a bad index, a bad indirect table, or a descriptor outside guest memory: no
    /// status byte can be trusted.
    Broken,
}

/// Why a walk found the chain [`Rewalk::Broken`] (logged at debug level).
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("More descriptors than the table holds (a loop)")]
    Loop,
    #[error("Next index out of range")]
    IndexOutOfRange,
    #[error("Indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("Indirect table length not a multiple of 16 or too large")]
    IndirectLength,
    #[error("Descriptor unreadable")]
    Unreadable(#[source] GuestMemoryError),
    #[error("Descriptor address overflows")]
    Overflow,
}

/// Walk a chain by hand, looking for an IOMMU fault on a descriptor or an indirect table, or
/// else for the chain's real last descriptor; the descriptors seen go to `out` (cleared here).
///
/// Used on the error path of a chain virtio-queue could not walk, and to walk again the chain
/// of a request parked on a fault (virtio-queue walks only chains it pops).
///
/// Each descriptor is read through one translation, and an IOMMU error on that read is a fault
/// like one found by a check: a translation may go away between two lookups in the same
/// session (an IOTLB invalidation, such as a lazy guest IOMMU's global flush, lands at any
/// time and a lookup after it misses), and such a chain is not broken, it waits for its miss.
pub(crate) fn rewalk<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Descriptor>,
) -> Rewalk {
    out.clear();
    match rewalk_inner(mem, desc_table, queue_size, head, out) {
        Ok(r) => r,
        Err((why, at)) => {
            log::debug!(
                "virtio-blk: chain {head} cannot be walked: {why}{} at descriptor address {:#x} \
                 (last seen {:?})",
                match &why {
                    Broken::Unreadable(e) => format!(": {e}"),
                    _ => String::new(),
                },
                at.0,
                out.last()
                    .map(|d| (d.addr().0, d.len(), d.flags(), d.next())),
            );
            Rewalk::Broken
        }
    }
}

fn rewalk_inner<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Descriptor>,
) -> Result<Rewalk, (Broken, GuestAddress)> {
    let mut table = desc_table;
    let mut size = queue_size;
    let mut idx = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    let desc_len = usize::try_from(DESC_LEN).map_err(|_| (Broken::Overflow, table))?;
    loop {
        if ttl == 0 {
            return Err((Broken::Loop, table));
        }
        if idx >= size {
            return Err((Broken::IndexOutOfRange, table));
        }
        ttl = ttl.saturating_sub(1);
        let addr = u64::from(idx)
            .checked_mul(DESC_LEN)
            .and_then(|off| table.checked_add(off))
            .ok_or((Broken::Overflow, table))?;
        let desc = match mem.read_obj::<RawDescriptor>(addr) {
            Ok(raw) => Descriptor::from(raw),
            Err(err) => {
                return match Fault::from_error(&err, addr, desc_len, Permissions::Read) {
                    Some(fault) => Ok(Rewalk::Fault(fault)),
                    None => Err((Broken::Unreadable(err), addr)),
                };
            }
        };
        if desc.refers_to_indirect_table() {
            if indirect {
                return Err((Broken::NestedIndirect, addr));
            }
            let len = usize::try_from(desc.len()).map_err(|_| (Broken::Overflow, addr))?;
            // The whole table first: one fault (one miss) for all of it. Its entries are read
            // again one by one below, each of which may fault in turn.
            if let Err(err) = check_readable(mem, desc.addr(), len) {
                return match Fault::from_error(&err, desc.addr(), len, Permissions::Read) {
                    Some(fault) => Ok(Rewalk::Fault(fault)),
                    None => Err((Broken::Unreadable(err), desc.addr())),
                };
            }
            if u64::from(desc.len()) % DESC_LEN != 0 {
                return Err((Broken::IndirectLength, addr));
            }
            size = u16::try_from(u64::from(desc.len()) / DESC_LEN)
                .map_err(|_| (Broken::IndirectLength, addr))?;
            ttl = size;
            table = desc.addr();
            idx = 0;
            indirect = true;
            continue;
        }
        out.push(desc);
        if !desc.has_next() {
            return Ok(Rewalk::End(desc));
        }
        idx = desc.next();
    }
}

/// The next chain on the avail ring, or the error that stops virtio-queue's walk of it (an
/// avail index more than a ring ahead of the device, or a ring out of memory).
/// `pop_descriptor_chain` logs that error and answers "none", while `enable_notification`
/// still sees entries available: a drain loop that asks both would spin forever on a broken
/// (or hostile) driver's ring.
pub(super) fn pop<M>(
    queue: &mut virtio_queue::Queue,
    mem: M,
) -> Result<Option<virtio_queue::DescriptorChain<M>>, virtio_queue::Error>
where
    M: Clone + std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::Bytes;
    let chain = queue.iter(mem.clone())?.next();
    if chain.is_some() {
        return Ok(chain);
    }
    // None also when the avail ring entry cannot be read (virtio-queue logs
    // it): then `enable_notification` sees the entry pending and a drain
    // loop spins forever (found by blk_chains: an avail ring whose second
    // page is not mapped). Read the entry again: unreadable, it is the
    // queue's error; readable, the driver published it just now and the
    // next pop takes it.
    let next = queue.next_avail();
    let idx = queue.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)?;
    if idx.0 == next {
        return Ok(None);
    }
    let entry = u64::from(next % queue.size().max(1)) * 2 + 4;
    let at = GuestAddress(queue.avail_ring())
        .checked_add(entry)
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    (*mem)
        .read_obj::<u16>(at)
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desc_len_is_sixteen() {
        assert_eq!(DESC_LEN, 16);
        let _ = GuestAddress(0).unchecked_add(DESC_LEN);
    }
}
