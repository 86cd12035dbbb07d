! Fortran interface to krun's native checkpointer (see krun_ghost.h for the semantics).
module krun_ghost
  use iso_c_binding
  implicit none
  interface
    integer(c_long) function krun_ghost_init(owner) bind(C, name="krun_ghost_init")
      import :: c_long, c_char
      character(kind=c_char), dimension(*), intent(in) :: owner
    end function
    type(c_ptr) function krun_ghost_alloc(len) bind(C, name="krun_ghost_alloc")
      import :: c_ptr, c_size_t
      integer(c_size_t), value :: len
    end function
    integer(c_int) function krun_ghost_register(name, addr, len) bind(C, name="krun_ghost_register")
      import :: c_int, c_char, c_ptr, c_size_t
      character(kind=c_char), dimension(*), intent(in) :: name
      type(c_ptr), value :: addr
      integer(c_size_t), value :: len
    end function
    integer(c_long) function krun_ghost_checkpoint() bind(C, name="krun_ghost_checkpoint")
      import :: c_long
    end function
    integer(c_long) function krun_ghost_wait() bind(C, name="krun_ghost_wait")
      import :: c_long
    end function
    integer(c_long) function krun_ghost_rollback(version) bind(C, name="krun_ghost_rollback")
      import :: c_long
      integer(c_long), value :: version
    end function
    integer(c_int) function krun_ghost_safepoint() bind(C, name="krun_ghost_safepoint")
      import :: c_int
    end function
  end interface
end module krun_ghost
