//! Interrupts: DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS.

use std::os::fd::OwnedFd;

use umdev_pci::IrqData;
use umdev_proto::{request, wire};

use super::{Reply, Session};
use crate::error::RequestError;

impl Session<'_> {
    pub(super) fn irq_info(&self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        request::no_fds(fds)?;
        let (req, _) = request::fixed::<wire::IrqInfo>(body, "DEVICE_GET_IRQ_INFO", |r| r.argsz)?;
        let info = self.function().irq_info(req.index)?;
        Ok(Reply::of(&wire::IrqInfo {
            argsz: wire::argsz::<wire::IrqInfo>(),
            flags: info.flags,
            index: req.index,
            count: info.count,
        }))
    }

    /// SET_IRQS: eventfds come as ancillary data, bools after the struct; the function
    /// checks the rest as the kernel's vfio-pci does.
    pub(super) fn set_irqs(&self, body: &[u8], fds: Vec<OwnedFd>) -> Result<Reply, RequestError> {
        let (req, tail) = request::fixed::<wire::IrqSet>(body, "DEVICE_SET_IRQS", |r| r.argsz)?;
        let data = match req.flags & wire::IRQ_SET_DATA_MASK {
            wire::IRQ_SET_DATA_EVENTFD => IrqData::Eventfds(fds),
            other => {
                request::no_fds(fds.len())?;
                if other == wire::IRQ_SET_DATA_BOOL {
                    IrqData::Bool(tail.to_vec())
                } else {
                    IrqData::None
                }
            }
        };
        self.function()
            .set_irqs(req.index, req.flags, req.start, req.count, data)?;
        Ok(Reply::empty())
    }
}
