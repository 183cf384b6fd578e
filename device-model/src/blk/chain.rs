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
    /// The chain does end, in this descriptor: virtio-queue gave up for a reason that leaves the
    /// request answerable (its lengths add up past 2^32, which virtio 1.2 section 2.7.5.2
    /// forbids), so the status byte can still carry `VIRTIO_BLK_S_IOERR`.
    End(Descriptor),
    /// A loop, a bad index or a bad indirect table: no status byte can be trusted.
    Broken,
}

/// Walk a chain by hand, looking for an IOMMU fault on a descriptor or an indirect table, or
/// else for the chain's real last descriptor; the descriptors seen go to `out` (cleared here).
///
/// Used on the error path of a chain virtio-queue could not walk, and to walk again the chain
/// of a request parked on a fault (virtio-queue walks only chains it pops).
pub(crate) fn rewalk<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Descriptor>,
) -> Rewalk {
    out.clear();
    rewalk_inner(mem, desc_table, queue_size, head, out).unwrap_or(Rewalk::Broken)
}

fn rewalk_inner<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Descriptor>,
) -> Option<Rewalk> {
    let mut table = desc_table;
    let mut size = queue_size;
    let mut idx = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    loop {
        if idx >= size || ttl == 0 {
            return None;
        }
        ttl = ttl.saturating_sub(1);
        let addr = table.checked_add(u64::from(idx).checked_mul(DESC_LEN)?)?;
        let desc_len = usize::try_from(DESC_LEN).ok()?;
        if let Err(err) = check_readable(mem, addr, desc_len) {
            return Fault::from_error(&err, addr, desc_len, Permissions::Read).map(Rewalk::Fault);
        }
        let desc = Descriptor::from(mem.read_obj::<RawDescriptor>(addr).ok()?);
        if desc.refers_to_indirect_table() {
            if indirect {
                return None;
            }
            let len = usize::try_from(desc.len()).ok()?;
            if let Err(err) = check_readable(mem, desc.addr(), len) {
                return Fault::from_error(&err, desc.addr(), len, Permissions::Read)
                    .map(Rewalk::Fault);
            }
            if u64::from(desc.len()) % DESC_LEN != 0 {
                return None;
            }
            size = u16::try_from(u64::from(desc.len()) / DESC_LEN).ok()?;
            ttl = size;
            table = desc.addr();
            idx = 0;
            indirect = true;
            continue;
        }
        out.push(desc);
        if !desc.has_next() {
            return Some(Rewalk::End(desc));
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
    use virtio_queue::QueueOwnedT;
    Ok(queue.iter(mem)?.next())
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
