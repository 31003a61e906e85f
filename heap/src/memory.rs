//! The heap itself: one anonymous private mapping, page aligned, so that the
//! program's pages are the kernel's pages (what CRIU dumps, what soft-dirty
//! tracking and userfaultfd see).

use std::io;

use crate::content::PAGE;

pub struct Region {
    ptr: *mut u8,
    pages: usize,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("ptr", &self.ptr)
            .field("pages", &self.pages)
            .finish()
    }
}

impl Region {
    /// Maps `pages` pages of anonymous memory. Nothing is touched yet.
    pub fn map(pages: usize) -> io::Result<Self> {
        let len = pages
            .checked_mul(PAGE)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "heap size overflows"))?;
        // SAFETY: a fresh anonymous mapping chosen by the kernel aliases
        // nothing; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // 4 KiB pages, as most heaps have: with transparent huge pages one
        // rewritten page would dirty 2 MiB. Advice only; failure is harmless.
        // SAFETY: the range is the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        Ok(Self {
            ptr: ptr.cast(),
            pages,
        })
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn page(&self, index: usize) -> &[u8; PAGE] {
        assert!(index < self.pages, "page {index} out of {}", self.pages);
        // SAFETY: in bounds (checked), the mapping lives as long as self, and
        // the shared borrow of self excludes writers.
        unsafe { &*self.ptr.add(index * PAGE).cast::<[u8; PAGE]>() }
    }

    pub fn page_mut(&mut self, index: usize) -> &mut [u8; PAGE] {
        assert!(index < self.pages, "page {index} out of {}", self.pages);
        // SAFETY: as in `page`, and the exclusive borrow of self excludes
        // every other reference into the mapping.
        unsafe { &mut *self.ptr.add(index * PAGE).cast::<[u8; PAGE]>() }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no borrow of it
        // outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.pages * PAGE) };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_aligned_zeroed_and_writable() {
        let mut r = Region::map(3).unwrap();
        assert_eq!(r.pages(), 3);
        assert_eq!(r.page(0).as_ptr() as usize % PAGE, 0);
        assert!(r.page(2).iter().all(|&b| b == 0));
        r.page_mut(2)[PAGE - 1] = 7;
        assert_eq!(r.page(2)[PAGE - 1], 7);
        assert_eq!(r.page(1)[0], 0);
    }

    #[test]
    #[should_panic(expected = "out of")]
    fn out_of_range_pages_panic() {
        let r = Region::map(1).unwrap();
        let _ = r.page(1);
    }
}
