//! The keeper's protocol on the wire: one SOCK_SEQPACKET message per
//! request or answer, its text and at most one fd.

use nix::sys::socket::{
    recvmsg, sendmsg, socket, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub(super) fn seqpacket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

pub(super) fn send(
    sock: BorrowedFd<'_>,
    text: &str,
    fd: Option<BorrowedFd<'_>>,
) -> nix::Result<()> {
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsg: Vec<ControlMessage<'_>> = raw
        .as_ref()
        .map(|r| ControlMessage::ScmRights(r))
        .into_iter()
        .collect();
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(text.as_bytes())],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map(|_| ())
}

/// One message: its text (None at EOF) and its fd, if any.
pub(super) fn recv(sock: BorrowedFd<'_>) -> nix::Result<(Option<String>, Option<OwnedFd>)> {
    recv_with(sock, MsgFlags::empty())
}

/// [`recv`] of a message that is there already: EAGAIN if none is.
pub(super) fn recv_now(sock: BorrowedFd<'_>) -> nix::Result<(Option<String>, Option<OwnedFd>)> {
    recv_with(sock, MsgFlags::MSG_DONTWAIT)
}

fn recv_with(
    sock: BorrowedFd<'_>,
    flags: MsgFlags,
) -> nix::Result<(Option<String>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )?;
    let mut fd = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for f in raw {
                // SAFETY: the kernel just gave us this fd.
                let owned = unsafe { OwnedFd::from_raw_fd(f) };
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    let n = msg.bytes;
    if n == 0 {
        return Ok((None, fd));
    }
    Ok((Some(String::from_utf8_lossy(&buf[..n]).into_owned()), fd))
}
