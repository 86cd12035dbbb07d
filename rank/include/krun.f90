! Fortran interface to the krun rank library (see krun.h for the semantics). Link -lkrun.
! Strings passed as names must end with c_null_char.
module krun
  use iso_c_binding
  implicit none
  integer(c_int), parameter :: KRUN_ANY_SOURCE = -1
  integer(c_int), parameter :: KRUN_ANY_TAG = -1
  type, bind(C) :: krun_status
    integer(c_int) :: source
    integer(c_int) :: tag
    integer(c_size_t) :: len
  end type
  interface
    integer(c_int) function krun_init() bind(C, name="krun_init")
      import :: c_int
    end function
    integer(c_int) function krun_finalize() bind(C, name="krun_finalize")
      import :: c_int
    end function
    integer(c_int) function krun_rank() bind(C, name="krun_rank")
      import :: c_int
    end function
    integer(c_int) function krun_size() bind(C, name="krun_size")
      import :: c_int
    end function
    integer(c_int) function krun_barrier() bind(C, name="krun_barrier")
      import :: c_int
    end function
    integer(c_int) function krun_send(dest, tag, buf, len) bind(C, name="krun_send")
      import :: c_int, c_ptr, c_size_t
      integer(c_int), value :: dest, tag
      type(c_ptr), value :: buf
      integer(c_size_t), value :: len
    end function
    integer(c_long) function krun_recv(src, tag, buf, cap, status) bind(C, name="krun_recv")
      import :: c_int, c_long, c_ptr, c_size_t, krun_status
      integer(c_int), value :: src, tag
      type(c_ptr), value :: buf
      integer(c_size_t), value :: cap
      type(krun_status), intent(out) :: status
    end function
    integer(c_int) function krun_win_allocate(len, base, win) bind(C, name="krun_win_allocate")
      import :: c_int, c_ptr, c_size_t, c_int64_t
      integer(c_size_t), value :: len
      type(c_ptr), intent(out) :: base
      integer(c_int64_t), intent(out) :: win
    end function
    integer(c_int) function krun_win_free(win) bind(C, name="krun_win_free")
      import :: c_int, c_int64_t
      integer(c_int64_t), value :: win
    end function
    integer(c_int) function krun_put(win, target, offset, buf, len) bind(C, name="krun_put")
      import :: c_int, c_int64_t, c_ptr, c_size_t
      integer(c_int64_t), value :: win
      integer(c_int), value :: target
      integer(c_size_t), value :: offset, len
      type(c_ptr), value :: buf
    end function
    integer(c_int) function krun_get(win, target, offset, buf, len) bind(C, name="krun_get")
      import :: c_int, c_int64_t, c_ptr, c_size_t
      integer(c_int64_t), value :: win
      integer(c_int), value :: target
      integer(c_size_t), value :: offset, len
      type(c_ptr), value :: buf
    end function
    integer(c_int) function krun_fetch_add(win, target, offset, add, old) bind(C, name="krun_fetch_add")
      import :: c_int, c_int64_t, c_size_t
      integer(c_int64_t), value :: win, add
      integer(c_int), value :: target
      integer(c_size_t), value :: offset
      integer(c_int64_t), intent(out) :: old
    end function
    type(c_ptr) function krun_alloc(len) bind(C, name="krun_alloc")
      import :: c_ptr, c_size_t
      integer(c_size_t), value :: len
    end function
    integer(c_int) function krun_register(name, addr, len) bind(C, name="krun_register")
      import :: c_int, c_char, c_ptr, c_size_t
      character(kind=c_char), dimension(*), intent(in) :: name
      type(c_ptr), value :: addr
      integer(c_size_t), value :: len
    end function
    integer(c_long) function krun_checkpoint() bind(C, name="krun_checkpoint")
      import :: c_long
    end function
    integer(c_int) function krun_safepoint() bind(C, name="krun_safepoint")
      import :: c_int
    end function
    integer(c_long) function krun_restored_version() bind(C, name="krun_restored_version")
      import :: c_long
    end function
    ! Distributed shared memory (semantics in krun.h): base gets the region's address
    ! (use c_f_pointer to view it as an array).
    integer(c_int) function krun_dsm_alloc(len, base) bind(C, name="krun_dsm_alloc")
      import :: c_int, c_ptr, c_size_t
      integer(c_size_t), value :: len
      type(c_ptr), intent(out) :: base
    end function
    integer(c_int) function krun_dsm_free(base) bind(C, name="krun_dsm_free")
      import :: c_int, c_ptr
      type(c_ptr), value :: base
    end function
    integer(c_int) function krun_dsm_lock(id) bind(C, name="krun_dsm_lock")
      import :: c_int
      integer(c_int), value :: id
    end function
    integer(c_int) function krun_dsm_unlock(id) bind(C, name="krun_dsm_unlock")
      import :: c_int
      integer(c_int), value :: id
    end function
    integer(c_int) function krun_dsm_barrier() bind(C, name="krun_dsm_barrier")
      import :: c_int
    end function
    type(c_ptr) function krun_last_error() bind(C, name="krun_last_error")
      import :: c_ptr
    end function
  end interface
end module krun
